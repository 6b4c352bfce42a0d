"""A full disk while an update is persisted leaves a consistent robot on both backends (issue 15 D4, D5, Build 4).

The fault is injected at the OS boundary (the safetensors write of the adapter state raises ``OSError(ENOSPC)``),
and, where a tmpfs can be mounted, for real: a file system filled to the last byte.
"""

import errno
import os

import pytest
import torch

from cdcca.edge import adapter_state as adapter_state_module
from cdcca.edge.adapter_slot import APPLIED, REJECTED, ROLLED_BACK, AdapterSlot
from cdcca.edge.backend import TorchBackend
from cdcca.edge.onnx_backend import OnnxBackend
from cdcca.envelope import VersionChain
from cdcca.models.trainable import trainable_parameters


def _perturbed(params: dict, seed: int, scale: float = 0.05) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=generator) for k, v in params.items()}


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _backend(kind: str, exported, trust, state_dir):
    student, export = exported
    if kind == "torch":
        return TorchBackend(AdapterSlot(student, "r1", trust, state_dir=state_dir))
    return OnnxBackend(export, "r1", trust, state_dir=state_dir, threads=1)


def _active_params(backend) -> dict:
    if isinstance(backend, TorchBackend):
        with backend.slot.model() as model:
            return {k: v.detach().clone() for k, v in trainable_parameters(model).items()}
    return {k: v.clone() for k, v in backend._active.params.items()}


def _slot(backend):
    """What keeps counters and ``newest_version``: the torch backend's slot, or the ONNX backend itself."""
    return backend.slot if isinstance(backend, TorchBackend) else backend


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["torch", "onnx"])
def test_a_failed_persist_changes_nothing_a_resend_applies_and_rollback_restores_what_ran_before(
        kind, exported, keys, few_samples, tmp_path, monkeypatch):  # fmt: skip
    # Prepare: the robot runs v2 (v1 before it); the cloud's chain holds v3 and v4
    signer, trust = keys
    state_dir = tmp_path / "state"
    backend = _backend(kind, exported, trust, state_dir)
    base = backend.slot.base if kind == "torch" else backend.base
    chain = VersionChain("r1", base)
    deltas = {}
    for version in (1, 2, 3, 4):
        deltas[version] = chain.make_delta(_perturbed(base, seed=version), "fp16", signer)
        chain.record_applied(version)
    assert backend.receive(deltas[1]).state == APPLIED and backend.receive(deltas[2]).state == APPLIED
    v2_params = _active_params(backend)
    sample = few_samples[0]
    v2_answer = backend.answer([sample.load_image()], [sample.prompt])

    # Execute + Assert: v3 cannot be persisted -> REJECTED with the cause, still v2 in memory and on disk
    monkeypatch.setattr(adapter_state_module, "save_file", _disk_full)
    status = backend.receive(deltas[3])
    assert (status.state, status.version) == (REJECTED, 3) and "No space left" in status.reason
    assert backend.version == 2 and _same(_active_params(backend), v2_params)
    assert _slot(backend).counters.persist_failures == 1 and _slot(backend).counters.applied == 2
    monkeypatch.undo()

    # the disk has room again: a resend of the same v3 applies (D5: the ONNX backend refused it as a replay)
    assert backend.receive(deltas[3]).state == APPLIED and backend.version == 3
    v3_params = _active_params(backend)
    assert not _same(v3_params, v2_params)

    # v4 fails to persist; rollback then returns to v3, what ran before (D4: the torch slot installed v4's weights)
    monkeypatch.setattr(adapter_state_module, "save_file", _disk_full)
    assert backend.receive(deltas[4]).state == REJECTED and backend.version == 3
    monkeypatch.undo()
    rolled = backend.rollback()
    assert (rolled.state, rolled.version, backend.version) == (ROLLED_BACK, 2, 2)
    assert rolled.reason.startswith("rolled back from v3")
    assert _same(_active_params(backend), v2_params)
    answer = backend.answer([sample.load_image()], [sample.prompt])
    assert answer.texts == v2_answer.texts and answer.adapter_version == 2

    # a restart resumes at the rolled-back version, and v3 and v4 stay refused as replays there too
    restarted = _backend(kind, exported, trust, state_dir)
    assert (restarted.version, _slot(restarted).newest_version) == (2, 3)
    assert _same(_active_params(restarted), v2_params)


@pytest.mark.parametrize("kind", ["torch", "onnx"])
def test_a_rollback_that_cannot_be_persisted_still_stops_the_adapter_and_says_so(
        kind, exported, keys, tmp_path, monkeypatch):  # fmt: skip
    signer, trust = keys
    backend = _backend(kind, exported, trust, tmp_path / "state")
    base = backend.slot.base if kind == "torch" else backend.base
    chain = VersionChain("r1", base)
    assert backend.receive(chain.make_delta(_perturbed(base, seed=1), "fp16", signer)).state == APPLIED
    monkeypatch.setattr(adapter_state_module, "save_file", _disk_full)

    status = backend.rollback("health check: non-finite entropy")

    assert (status.state, status.version, backend.version) == (ROLLED_BACK, 0, 0)
    assert status.reason.startswith("rolled back from v1: health check: non-finite entropy (not persisted")
    assert _same(_active_params(backend), base) and _slot(backend).counters.persist_failures == 1


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs: a real file system that can be filled (needs root and the right to mount; skipped elsewhere)."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"a real full disk needs a tmpfs mount, refused here: {done.stderr.strip() or 'not root'}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(directory):
    """Write one file until the file system has no room left (ENOSPC); returns it."""
    import os

    path = directory / "filler"
    handle = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(handle, b"\0" * 65536)
    except OSError as err:
        assert err.errno == errno.ENOSPC
    finally:
        os.close(handle)
    return path


@pytest.mark.parametrize("kind", ["torch", "onnx"])
def test_a_really_full_disk_is_a_rejection_and_a_resend_applies_once_there_is_room(kind, exported, keys, small_disk):
    """No patching: the libraries' own errors for ENOSPC (safetensors' ``SafetensorError``, ORT's ``RuntimeError``
    when it writes the ``.onnx_adapter`` files) must become the REJECTED status the patched tests above get."""
    signer, trust = keys
    backend = _backend(kind, exported, trust, small_disk / "state")
    base = backend.slot.base if kind == "torch" else backend.base
    chain = VersionChain("r1", base)
    deltas = {}
    for version in (1, 2):
        deltas[version] = chain.make_delta(_perturbed(base, seed=version), "fp16", signer)
        chain.record_applied(version)
    assert backend.receive(deltas[1]).state == APPLIED
    v1_params = _active_params(backend)
    adapters = small_disk / "state" / "onnx_adapters"
    files_before = sorted(p.name for p in adapters.iterdir()) if kind == "onnx" else None

    filler = _fill(small_disk)
    status = backend.receive(deltas[2])
    assert (status.state, status.version) == (REJECTED, 2), status.reason
    assert backend.version == 1 and _same(_active_params(backend), v1_params)
    assert _slot(backend).counters.persist_failures == 1
    if kind == "onnx":  # no half-written adapter file is left behind
        assert sorted(p.name for p in adapters.iterdir()) == files_before

    filler.unlink()
    assert backend.receive(deltas[2]).state == APPLIED and backend.version == 2  # room again: the resend applies

    _fill(small_disk)
    rolled = backend.rollback("health check")  # cannot be persisted, but the adapter stops all the same
    assert (rolled.state, rolled.version, backend.version) == (ROLLED_BACK, 1, 1) and "(not persisted" in rolled.reason
    assert _slot(backend).counters.persist_failures == 2 and _same(_active_params(backend), v1_params)


def _refused_when_the_state_file_cannot_be_written(backend, delta, monkeypatch) -> None:
    """``delta`` arrives while the disk fills after the previous adapter was kept, before the state file lands."""
    write = adapter_state_module.save_file

    def state_file_full(params, path, metadata):
        if path.endswith(adapter_state_module.STATE_FILE + ".partial"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(params, path, metadata)

    monkeypatch.setattr(adapter_state_module, "save_file", state_file_full)
    assert backend.receive(delta).state == REJECTED
    monkeypatch.undo()


def _robot_and_deltas(kind, exported, keys, state_dir, versions=(1, 2)):
    """A robot of ``kind`` on ``state_dir`` and the cloud's signed deltas for ``versions``, each incremental on the
    one before (made ahead, as a cloud that published them in order)."""
    signer, trust = keys
    backend = _backend(kind, exported, trust, state_dir)
    base = backend.slot.base if kind == "torch" else backend.base
    chain = VersionChain("r1", base)
    deltas = {}
    for version in versions:
        deltas[version] = chain.make_delta(_perturbed(base, seed=version), "fp16", signer)
        chain.record_applied(version)
    return backend, deltas


@pytest.mark.parametrize("kind", ["torch", "onnx"])
def test_a_restarted_robot_can_still_roll_back_one_level(kind, exported, keys, few_samples, tmp_path):
    # Prepare: the robot applied v1 then v2 and stopped
    state_dir = tmp_path / "state"
    backend, deltas = _robot_and_deltas(kind, exported, keys, state_dir)
    sample = few_samples[0]
    assert backend.receive(deltas[1]).state == APPLIED
    v1_params = _active_params(backend)
    v1_answer = backend.answer([sample.load_image()], [sample.prompt])
    assert backend.receive(deltas[2]).state == APPLIED

    # Execute: a restart, then a rollback
    restarted = _backend(kind, exported, keys[1], state_dir)
    assert restarted.version == 2
    rolled = restarted.rollback("health check: after a restart")

    # Assert: back on v1, bit for bit, answering as v1 did; one level only, and that survives a restart too
    assert (rolled.state, rolled.version, restarted.version) == (ROLLED_BACK, 1, 1)
    assert _same(_active_params(restarted), v1_params)
    answer = restarted.answer([sample.load_image()], [sample.prompt])
    assert answer.texts == v1_answer.texts and answer.adapter_version == 1
    assert restarted.rollback().state == REJECTED
    again = _backend(kind, exported, keys[1], state_dir)
    assert again.version == 1 and again.rollback().state == REJECTED


@pytest.mark.parametrize("kind", ["torch", "onnx"])
def test_the_first_version_keeps_the_base_to_roll_back_to_without_writing_it(kind, exported, keys, tmp_path):
    state_dir = tmp_path / "state"
    backend, deltas = _robot_and_deltas(kind, exported, keys, state_dir, versions=(1,))
    base_params = _active_params(backend)
    assert backend.receive(deltas[1]).state == APPLIED
    from safetensors import safe_open

    with safe_open(str(state_dir / adapter_state_module.STATE_FILE), framework="numpy") as handle:
        assert set(handle.keys()) == set(base_params) and handle.metadata()["previous_version"] == "0"
    assert not list(state_dir.glob(adapter_state_module.PREVIOUS_FILES))
    restarted = _backend(kind, exported, keys[1], state_dir)
    assert restarted.rollback().version == 0 and restarted.version == 0
    assert _same(_active_params(restarted), base_params)


@pytest.mark.parametrize("kind", ["torch", "onnx"])
def test_a_previous_adapter_that_cannot_be_used_costs_only_the_rollback(kind, exported, keys, tmp_path, caplog):
    # Prepare: v2 over v1, then the previous adapter's file is damaged
    state_dir = tmp_path / "state"
    backend, deltas = _robot_and_deltas(kind, exported, keys, state_dir)
    assert backend.receive(deltas[1]).state == APPLIED and backend.receive(deltas[2]).state == APPLIED
    v2_params = _active_params(backend)
    from safetensors import safe_open

    with safe_open(str(state_dir / adapter_state_module.STATE_FILE), framework="numpy") as handle:
        assert set(handle.keys()) == set(v2_params)  # the current file is what a release without the previous reads
    previous = adapter_state_module.previous_file(state_dir, 1)
    previous.write_bytes(previous.read_bytes()[:100])

    # Execute + Assert: v2 restores and answers; only the rollback is gone, and the log says why
    restarted = _backend(kind, exported, keys[1], state_dir)
    assert restarted.version == 2 and _same(_active_params(restarted), v2_params)
    assert "without the previous adapter v1" in caplog.text
    assert restarted.rollback().state == REJECTED


@pytest.mark.parametrize("kind", ["torch", "onnx"])
def test_a_swap_that_fails_halfway_keeps_the_running_versions_rollback_across_a_restart(
        kind, exported, keys, tmp_path, monkeypatch):  # fmt: skip
    # Prepare: v2 over v1; v3's previous adapter (v2) is kept, then the disk fills before the state file
    state_dir = tmp_path / "state"
    backend, deltas = _robot_and_deltas(kind, exported, keys, state_dir, versions=(1, 2, 3))
    assert backend.receive(deltas[1]).state == APPLIED
    v1_params = _active_params(backend)
    assert backend.receive(deltas[2]).state == APPLIED
    _refused_when_the_state_file_cannot_be_written(backend, deltas[3], monkeypatch)

    # Execute: a restart
    restarted = _backend(kind, exported, keys[1], state_dir)

    # Assert: v2 runs, and its rollback to v1 is still there
    assert restarted.version == 2
    rolled = restarted.rollback()
    assert (rolled.state, rolled.version) == (ROLLED_BACK, 1) and _same(_active_params(restarted), v1_params)


@pytest.mark.parametrize("links", [True, False], ids=["hard_link", "no_hard_links"])
def test_the_previous_adapter_is_the_old_state_file_linked_not_copied(links, exported, keys, tmp_path, monkeypatch):
    # Prepare: v1 persisted; on a file system without hard links (FAT) os.link fails
    state_dir = tmp_path / "state"
    backend, deltas = _robot_and_deltas("onnx", exported, keys, state_dir)
    assert backend.receive(deltas[1]).state == APPLIED
    v1_file = os.stat(state_dir / adapter_state_module.STATE_FILE).st_ino
    v1_params = _active_params(backend)
    if not links:
        monkeypatch.setattr(os, "link", lambda *args: _raise(OSError(errno.EPERM, "Operation not permitted")))

    # Execute
    assert backend.receive(deltas[2]).state == APPLIED

    # Assert: v1's file is the previous adapter (the same inode where links work), and a restart rolls back to it
    kept = adapter_state_module.previous_file(state_dir, 1)
    assert (os.stat(kept).st_ino == v1_file) is links
    monkeypatch.undo()
    restarted = _backend("onnx", exported, keys[1], state_dir)
    assert restarted.rollback().version == 1 and _same(_active_params(restarted), v1_params)


def _raise(err):
    raise err


def test_a_swap_resent_after_it_failed_halfway_leaves_no_second_name_for_a_file(exported, keys, tmp_path, monkeypatch):
    # Prepare: v1 applied; v2's state file cannot be written after v1's file was kept as the previous adapter
    state_dir = tmp_path / "state"
    backend, deltas = _robot_and_deltas("onnx", exported, keys, state_dir, versions=(1, 2, 3))
    assert backend.receive(deltas[1]).state == APPLIED
    _refused_when_the_state_file_cannot_be_written(backend, deltas[2], monkeypatch)

    # Execute: the resend of v2 applies, then v3
    assert backend.receive(deltas[2]).state == APPLIED and backend.receive(deltas[3]).state == APPLIED

    # Assert: only the state file and v2's previous file, each one name for its data
    files = sorted(p.name for p in state_dir.iterdir() if p.is_file())
    assert files == ["adapter.previous-v2.safetensors", "adapter.safetensors"]
    assert all(os.stat(state_dir / name).st_nlink == 1 for name in files)
    assert _backend("onnx", exported, keys[1], state_dir).rollback().version == 2
