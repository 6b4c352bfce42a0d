"""The base-student fingerprint: what it covers, and a robot on other weights rejecting a delta (issue 17, §4)."""

import logging

import numpy as np
import pytest
import torch

from cdcca import envelope, wire
from cdcca.edge.adapter_slot import APPLIED, REJECTED, AdapterSlot
from cdcca.envelope import VersionChain
from cdcca.fingerprint import FINGERPRINT_CHARS, student_fingerprint, weights_fingerprint
from cdcca.models.checkpoint import build_pair
from cdcca.models.presets import get_preset
from cdcca.models.trainable import add_lora, trainable_parameters


def _student(tokenizer, seed: int):
    _, student = build_pair(get_preset("test"), tokenizer, seed=seed)
    return add_lora(student.eval())


def _updated(params: dict, scale: float = 0.05) -> dict:
    generator = torch.Generator().manual_seed(3)
    return {k: v + scale * torch.randn(v.shape, generator=generator) for k, v in params.items()}


def _frozen(student) -> dict:
    trainable = trainable_parameters(student)
    return {n: p for n, p in student.blip2.named_parameters() if n not in trainable}


def test_fingerprint_covers_frozen_bytes_and_trainable_layout_not_trainable_values():
    # Prepare
    trainable = {"lora.A": np.zeros((2, 3), np.float32), "bias": np.zeros(3, np.float32)}
    frozen = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "scale": np.float32(2.0)}
    reference = weights_fingerprint(trainable, frozen)

    # Execute / Assert
    assert len(reference) == FINGERPRINT_CHARS and int(reference, 16) >= 0
    assert weights_fingerprint({k: v + 1 for k, v in trainable.items()}, frozen) == reference  # values: no
    assert weights_fingerprint({**trainable, "bias": np.zeros(4, np.float32)}, frozen) != reference  # shape
    assert weights_fingerprint({**trainable, "bias": np.zeros(3, np.float16)}, frozen) != reference  # dtype
    assert weights_fingerprint({**trainable, "extra": np.zeros(1, np.float32)}, frozen) != reference  # name
    changed = frozen["w"].copy()
    changed[1, 2] = np.nextafter(changed[1, 2], np.float32(100))  # one ulp in one frozen value
    assert weights_fingerprint(trainable, {**frozen, "w": changed}) != reference
    assert weights_fingerprint(trainable, {**frozen, "w": frozen["w"].reshape(3, 2)}) != reference
    # torch tensors hash like the numpy arrays they hold, in any order of the maps
    as_torch = {k: torch.from_numpy(np.asarray(v)) for k, v in reversed(list(frozen.items()))}
    assert weights_fingerprint(trainable, as_torch) == reference
    bf16 = {"w": torch.ones(4, dtype=torch.bfloat16)}  # a dtype numpy lacks is hashed as raw bytes
    assert weights_fingerprint({}, bf16) != weights_fingerprint({}, {"w": torch.ones(4, dtype=torch.float16)})


def test_student_fingerprint_is_the_same_for_the_same_weights_and_cached(tokenizer):
    # Prepare
    first, again, other = _student(tokenizer, 0), _student(tokenizer, 0), _student(tokenizer, 1)

    # Execute
    print_first = student_fingerprint(first)

    # Assert
    assert print_first == student_fingerprint(again) != student_fingerprint(other)
    with torch.no_grad():  # training changes the trainable set only: same base
        for param in trainable_parameters(again).values():
            param.add_(0.5)
    assert weights_fingerprint(trainable_parameters(again), _frozen(again)) == print_first
    with torch.no_grad():  # a changed frozen weight is another base (the cache holds the start-up value)
        next(iter(_frozen(again).values())).add_(1e-3)
    assert weights_fingerprint(trainable_parameters(again), _frozen(again)) != print_first
    assert student_fingerprint(again) == print_first  # hashed once per model object


def test_robot_on_other_weights_rejects_the_delta_with_both_fingerprints(tokenizer, keys):
    # Prepare: the cloud's base is seed 0; the robot runs seed 1 with the same trainable layout
    signer, trust = keys
    cloud_student, robot_student = _student(tokenizer, 0), _student(tokenizer, 1)
    cloud_print, robot_print = student_fingerprint(cloud_student), student_fingerprint(robot_student)
    slot = AdapterSlot(robot_student, "r1", trust)
    before = {k: v.clone() for k, v in slot.current.items()}
    chain = VersionChain("r1", slot.base, base_fingerprint=cloud_print)

    # Execute
    msg = wire.decode(wire.WEIGHT_DELTA, wire.encode(chain.make_delta(_updated(slot.base), "fp16", signer)))
    status = slot.receive(msg)

    # Assert
    assert msg.base_fingerprint == cloud_print
    assert (status.state, slot.version, slot.counters.rejected) == (REJECTED, 0, 1)
    assert status.reason == f"base fingerprint mismatch: delta for {cloud_print}, robot has {robot_print}"
    with slot.model() as active:
        live = trainable_parameters(active)
        assert all(torch.equal(live[k], before[k]) for k in before)


def test_matching_fingerprint_applies_and_an_empty_one_is_accepted_with_a_warning(tokenizer, keys, caplog):
    # Prepare
    signer, trust = keys
    student = _student(tokenizer, 0)
    slot = AdapterSlot(student, "r1", trust)
    matching = VersionChain("r1", slot.base, base_fingerprint=student_fingerprint(_student(tokenizer, 0)))
    old_cloud = VersionChain("r1", slot.base, latest=1)  # states no fingerprint
    envelope._WARNED_NO_FINGERPRINT.discard("r1")  # the warning is said once per robot and process

    # Execute
    applied = slot.receive(matching.make_delta(_updated(slot.base), "fp16", signer))
    with caplog.at_level(logging.WARNING, logger="cdcca.envelope"):
        unstated = slot.receive(old_cloud.make_delta(_updated(slot.base, 0.01), "fp16", signer))

    # Assert
    assert (applied.state, unstated.state, slot.version) == (APPLIED, APPLIED, 2)
    assert any("states no base fingerprint" in r.getMessage() for r in caplog.records)


def test_fingerprint_is_signed(tokenizer, keys):
    signer, trust = keys
    slot = AdapterSlot(_student(tokenizer, 0), "r1", trust, base_fingerprint="")  # check off: the signature alone
    msg = VersionChain("r1", slot.base, base_fingerprint="0123456789abcdef").make_delta(_updated(slot.base), "fp16",
                                                                                       signer)  # fmt: skip
    msg.base_fingerprint = ""  # stripped in transit to slip past the check

    status = slot.receive(msg)

    assert status.state == REJECTED and "bad signature" in status.reason


def test_adapter_state_of_another_base_is_not_restored(tokenizer, keys, tmp_path):
    # Prepare: v1 persisted on a seed-0 robot
    signer, trust = keys
    slot = AdapterSlot(_student(tokenizer, 0), "r1", trust, state_dir=tmp_path)
    chain = VersionChain("r1", slot.base, base_fingerprint=slot.base_fingerprint)
    assert slot.receive(chain.make_delta(_updated(slot.base), "fp16", signer)).state == APPLIED

    # Execute: the same state folder under other weights, then under the same ones
    other = AdapterSlot(_student(tokenizer, 1), "r1", trust, state_dir=tmp_path)
    same = AdapterSlot(_student(tokenizer, 0), "r1", trust, state_dir=tmp_path)

    # Assert
    assert (other.version, other.counters.restore_failures) == (0, 1)
    assert (same.version, same.counters.restore_failures) == (1, 0)


@pytest.mark.parametrize("stated", ["", "ffffffffffffffff"])
def test_a_robot_without_its_own_fingerprint_checks_nothing(tokenizer, keys, stated):
    signer, trust = keys
    slot = AdapterSlot(_student(tokenizer, 0), "r1", trust, base_fingerprint="")
    msg = VersionChain("r1", slot.base, base_fingerprint=stated).make_delta(_updated(slot.base), "fp16", signer)
    assert slot.receive(msg).state == APPLIED
