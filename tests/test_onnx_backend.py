"""ONNX Runtime backend: export layout, parity with the torch backend before and after a signed swap, atomic
swaps under concurrent answers, rollback, persistence, rejections, and export/adapter mismatches."""

import threading

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file

from cdcca.data.digits_shift import load_domain
from cdcca.edge.adapter_slot import APPLIED, REJECTED, ROLLED_BACK, AdapterSlot
from cdcca.edge.backend import TorchBackend
from cdcca.edge.onnx_backend import OnnxBackend
from cdcca.edge.onnx_export import BASE_FILE, OnnxExport, OnnxModelMismatch, export_onnx, read_adapter, write_adapters
from cdcca.envelope import VersionChain, seal
from cdcca.models.trainable import add_lora, trainable_parameters

LOGIT_ATOL = 1e-4  # float32 graphs vs torch eager: observed differences are ~1e-6


@pytest.fixture(scope="module")
def samples():
    return [s for domain in ("source", "printed", "rephrased") for s in load_domain(domain, "test", limit=12)]


def _perturbed(params: dict, seed: int, scale: float = 0.05) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=generator) for k, v in params.items()}


def _answers(backend, samples) -> list:
    return [backend.answer([s.load_image()], [s.prompt]) for s in samples]


def test_export_exposes_the_trainable_set_as_overridable_initializers(exported):
    student, export = exported
    trainable = trainable_parameters(student)
    sessions = {graph: ort.InferenceSession(str(export.directory / info["file"]))
                for graph, info in export.manifest["graphs"].items()}  # fmt: skip

    overridable = {g: {i.name for i in s.get_overridable_initializers()} for g, s in sessions.items()}

    assert overridable["encoder"] | overridable["decoder"] == set(trainable)
    assert not overridable["encoder"] & overridable["decoder"]
    assert "query_tokens" in overridable["encoder"]
    assert any("lora_A" in n for n in overridable["decoder"]) and any("lora_B" in n for n in overridable["decoder"])
    assert all(n.startswith("language_model.") for n in overridable["decoder"])
    assert all(torch.equal(export.base()[n], trainable[n]) for n in trainable)
    assert {i.name for i in sessions["encoder"].get_inputs()} == {"pixel_values"}  # base values are defaults


def test_same_answers_and_logits_as_torch_before_and_after_a_signed_swap(exported, keys, samples):
    student, export = exported
    signer, trust = keys
    torch_backend = TorchBackend(AdapterSlot(student, "r1", trust))
    onnx_backend = OnnxBackend(export, "r1", trust, threads=1)
    chain = VersionChain("r1", onnx_backend.base)
    delta = chain.make_delta(_perturbed(onnx_backend.base, seed=1), "fp16", signer)
    images, prompts = [s.load_image() for s in samples[:6]], [s.prompt for s in samples[:6]]
    rounds = []
    for _ in ("before", "after"):
        expected, got = _answers(torch_backend, samples), _answers(onnx_backend, samples)
        with torch.inference_mode(), torch_backend.slot.model() as model:
            soft_prompt = model.encode_visual(images)
            torch_logits = model.lm_forward(soft_prompt, prompts).logits[:, -1]  # first generated token
        onnx_logits = []
        onnx_backend.generate(soft_prompt.numpy(), prompts, logits_out=onnx_logits)
        rounds.append([a.texts[0] for a in expected])

        agreement = np.mean([e.texts[0] == g.texts[0] for e, g in zip(expected, got)])
        assert agreement >= 0.99
        assert all(e.adapter_version == g.adapter_version for e, g in zip(expected, got))
        entropy_gap = max(abs(float(e.sample_entropy[0] - g.sample_entropy[0])) for e, g in zip(expected, got))
        assert entropy_gap < 1e-4
        np.testing.assert_allclose(got[0].visual_tokens, expected[0].visual_tokens, rtol=0, atol=1e-5)
        np.testing.assert_allclose(onnx_logits[0], torch_logits.numpy(), atol=LOGIT_ATOL)
        if len(rounds) == 1:
            assert onnx_backend.receive(delta).state == APPLIED and torch_backend.receive(delta).state == APPLIED
    assert onnx_backend.version == torch_backend.version == 1
    assert rounds[0] != rounds[1]  # the swap really changed the model


def test_answers_in_flight_keep_their_adapter_while_deltas_arrive(exported, keys, samples):
    _, export = exported
    signer, trust = keys
    backend = OnnxBackend(export, "r2", trust, threads=1)
    chain = VersionChain("r2", backend.base)
    targets = [backend.base, _perturbed(backend.base, seed=2, scale=0.2)]  # even versions: base, odd: perturbed
    messages = []
    for version in range(1, 9):
        messages.append(chain.make_delta(targets[version % 2], "fp16", signer))
        chain.record_applied(version)  # built ahead, applied in order: each is incremental on the previous
    sample = samples[3]
    expected = [backend.answer([sample.load_image()], [sample.prompt]).texts[0]]
    backend.receive(messages[0])
    expected.append(backend.answer([sample.load_image()], [sample.prompt]).texts[0])
    assert expected[0] != expected[1]  # the two adapters answer differently
    seen, failures, stop = [], [], threading.Event()

    def answering() -> None:
        while not stop.is_set():
            try:
                result = backend.answer([sample.load_image()], [sample.prompt])
                seen.append((result.adapter_version, result.texts[0]))
            except Exception as err:  # noqa: BLE001 - a failed answer is what this test looks for
                failures.append(err)

    thread = threading.Thread(target=answering)
    thread.start()
    statuses = []
    for msg in messages[1:]:
        statuses.append(backend.receive(msg).state)
        threading.Event().wait(0.01)
    stop.set()
    thread.join()

    assert statuses == [APPLIED] * 7 and backend.version == 8 and not failures
    assert len(seen) >= 6
    assert all(text == expected[version % 2] for version, text in seen)  # never a mix of two adapters


def test_rejections_rollback_and_persistence(exported, keys, samples, tmp_path):
    _, export = exported
    signer, trust = keys
    backend = OnnxBackend(export, "r3", trust, state_dir=tmp_path / "state")
    chain = VersionChain("r3", backend.base)
    v1 = chain.make_delta(_perturbed(backend.base, seed=3), "fp16", signer)
    chain.record_applied(1)
    v2 = chain.make_delta(_perturbed(backend.base, seed=4), "fp16", signer)
    tampered = chain.make_delta(_perturbed(backend.base, seed=5), "fp16", signer)
    tampered.signature[0] ^= 0xFF
    sample = samples[0]

    assert backend.receive(v2).state == REJECTED  # based on v1, robot runs v0
    assert backend.receive(v1).state == APPLIED
    v1_answer = backend.answer([sample.load_image()], [sample.prompt])
    assert backend.receive(tampered).reason.startswith("bad signature")
    assert backend.receive(v2).state == APPLIED and backend.version == 2
    status = backend.rollback()
    assert (status.state, status.version, backend.version) == (ROLLED_BACK, 1, 1)
    assert backend.answer([sample.load_image()], [sample.prompt]).texts == v1_answer.texts
    assert backend.rollback().state == REJECTED  # one level only
    assert backend.receive(v2).state == REJECTED  # a replay, although the robot runs v1
    assert len(list((tmp_path / "state" / "onnx_adapters").glob("*.onnx_adapter"))) == 2  # current, one graph each

    restarted = OnnxBackend(export, "r3", trust, state_dir=tmp_path / "state")

    assert restarted.version == 1 and restarted.newest_version == 2
    restarted_answer = restarted.answer([sample.load_image()], [sample.prompt])
    assert restarted_answer.texts == v1_answer.texts
    assert np.array_equal(restarted_answer.sample_entropy, v1_answer.sample_entropy)


def test_mismatched_exports_and_adapters_are_clear_errors(exported, pair, keys, tmp_path):
    _, export = exported
    signer, trust = keys
    other = export_onnx(add_lora(pair[1]), tmp_path / "other")  # an untrained student: other frozen weights
    files = write_adapters(other, other.base(), tmp_path / "adapters", "v0")

    with pytest.raises(OnnxModelMismatch, match="another export"):
        read_adapter(export, files["decoder"])
    assert set(read_adapter(other, files["decoder"])) == set(other.graph_params("decoder"))
    wrong_shape = {**export.base(), "query_tokens": torch.zeros(1, 3, 32)}
    with pytest.raises(OnnxModelMismatch, match="re-export"):
        write_adapters(export, wrong_shape, tmp_path / "adapters", "bad")
    with pytest.raises(OnnxModelMismatch, match="not an ONNX export"):
        OnnxExport.load(tmp_path)
    state = tmp_path / "state"
    foreign = OnnxBackend(other, "r4", trust, state_dir=state)  # persists a state for the other student
    assert foreign.receive(VersionChain("r4", other.base()).make_delta(other.base(), "fp16", signer)).state == APPLIED

    restored = OnnxBackend(export, "r4", trust, state_dir=state)

    assert restored.version == 0 and restored.counters.restore_failures == 1
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for path in export.directory.iterdir():
        (mixed / path.name).write_bytes(path.read_bytes())
    save_file({("x_" + k if k == "query_tokens" else k): v for k, v in other.base().items()}, str(mixed / BASE_FILE))
    with pytest.raises(OnnxModelMismatch, match="missing"):
        OnnxBackend(mixed, "r5", trust)


def test_external_data_export_answers_as_the_inline_one_before_and_after_a_swap(exported, keys, samples, tmp_path):
    """Students past protobuf's 2 GiB must keep tensors beside the graph; forced here on the small one."""
    student, inline_export = exported
    signer, trust = keys
    external = export_onnx(student, tmp_path / "external", external_data=True)
    for info in external.manifest["graphs"].values():
        graph, data = external.directory / info["file"], external.directory / (info["file"] + ".data")
        model = onnx.load(str(graph), load_external_data=False)
        stored = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert stored and {e.value for t in stored for e in t.external_data if e.key == "location"} == {data.name}
        inline = [t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
        assert all(onnx.numpy_helper.to_array(t).nbytes < 1024 for t in inline)  # only the tiny ones stay
    assert external.manifest["student_id"] == inline_export.manifest["student_id"]
    assert not list(inline_export.directory.glob("*.data"))  # small graphs stay inline by default
    backends = [OnnxBackend(export, "r1", trust, threads=1) for export in (inline_export, external)]
    delta = VersionChain("r1", backends[0].base).make_delta(_perturbed(backends[0].base, seed=3), "fp16", signer)
    for when in ("before", "after"):
        texts = [[a.texts[0] for a in _answers(backend, samples[:8])] for backend in backends]
        assert texts[0] == texts[1]
        logits = [[], []]
        for backend, out in zip(backends, logits):
            prompt = backend.sessions["encoder"].run(None, {"pixel_values": backend._pixel_values(
                [samples[0].load_image()])}, backend._active.run_options["encoder"])[1]  # fmt: skip
            backend.generate(prompt, [samples[0].prompt], logits_out=out)
        np.testing.assert_array_equal(logits[0][0], logits[1][0])  # the same graphs and weights, bit for bit
        if when == "before":
            assert all(backend.receive(delta).state == APPLIED for backend in backends)
    assert [backend.version for backend in backends] == [1, 1]


@pytest.mark.parametrize("shape", [(24, 24), (40, 40), (480, 640), (17, 30), (100, 7)])
def test_pixel_values_are_those_of_the_torch_preprocess(exported, keys, shape):
    """Resized in numpy as torch resizes (antialiased bilinear), without torch; unresized, bit for bit."""
    student, export = exported
    backend = OnnxBackend(export, "r1", keys[1])
    image = np.random.default_rng(shape[1]).integers(0, 256, (*shape, 3), dtype=np.uint8)

    got, expected = backend._pixel_values([image, image[::-1]]), student.preprocess([image, image[::-1]]).numpy()

    assert got.dtype == np.float32 and got.shape == expected.shape == (2, 3, 24, 24)
    if shape == (24, 24):
        assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)  # torch computes its weights in float32


def test_adapters_written_from_numpy_equal_those_written_from_torch(exported, tmp_path):
    _, export = exported
    from_numpy = write_adapters(export, export.base_arrays(), tmp_path, "numpy")
    from_torch = write_adapters(export, export.base(), tmp_path, "torch")

    for graph in export.manifest["graphs"]:
        left, right = read_adapter(export, from_numpy[graph]), read_adapter(export, from_torch[graph])
        assert list(left) == list(right) and all(np.array_equal(left[n], right[n]) for n in left)


def test_the_tokenizer_without_transformers_encodes_and_decodes_as_the_students(exported, keys, samples):
    student, export = exported
    backend = OnnxBackend(export, "r1", keys[1])
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, len(student.tokenizer), 12).tolist() for _ in range(50)]

    assert backend.tokenizer._fast is not None  # the export's tokenizer.json, through `tokenizers`
    for sample in samples:
        assert backend.tokenizer.encode(sample.prompt) == student.tokenizer(sample.prompt)["input_ids"]
    for ids in sequences:
        expected = " ".join(student.tokenizer.decode(ids, skip_special_tokens=True).split())
        assert " ".join(backend.tokenizer.decode(ids).split()) == expected


@pytest.mark.parametrize(("codec", "payload", "reason"), [
    ("ecsq", b"not a safetensors container", "cannot decode 'ecsq' payload"),
    ("no-such-codec", b"x", "has no numpy decoder"),
])  # fmt: skip
def test_a_signed_but_undecodable_delta_is_rejected_in_numpy_and_nothing_changes(exported, keys, codec, payload,
                                                                                 reason):  # fmt: skip
    _, export = exported
    signer, trust = keys
    backend = OnnxBackend(export, "r1", trust, threads=1)
    total = int(sum(np.prod(shape) for shape in export.manifest["shapes"].values()))
    msg = seal(payload, robot_id="r1", version=1, base_version=0, keyframe=True, codec=codec, num_params=total,
               signer=signer)  # fmt: skip

    status = backend.receive(msg)

    assert status.state == REJECTED and reason in status.reason
    assert backend.version == 0 and backend.counters.rejected == 1


def test_export_mc_layers_must_fit_the_vision_encoder(pretrained_test_pair, tmp_path, capsys):
    from cdcca.cli import main

    command = ["export", "--backend", "onnx", "--model", str(pretrained_test_pair), "--out", str(tmp_path / "x")]

    assert main(command + ["--mc-layers", "2"]) == 2  # the test preset's encoder has one layer
    assert "mc_layers must be in 1..1" in capsys.readouterr().err
    assert main(command + ["--mc-layers", "1"]) == 0
    assert OnnxExport.load(tmp_path / "x").manifest["uts"]["mc_layers"] == 1


def test_two_threads_answer_as_one_and_a_single_prompt_decodes_on_one_thread(exported, keys, samples):
    _, export = exported
    one, two = OnnxBackend(export, "r1", keys[1], threads=1), OnnxBackend(export, "r1", keys[1], threads=2)

    first, second = _answers(one, samples), _answers(two, samples)

    assert [a.texts for a in first] == [a.texts for a in second]
    assert all(np.array_equal(a.sample_entropy, b.sample_entropy) for a, b in zip(first, second))
    assert one._single_decoder is one.sessions["decoder"]  # one thread already: no second session
    assert two._single_decoder is not two.sessions["decoder"]
    assert two._single_decoder.get_session_options().intra_op_num_threads == 1
    assert two.sessions["decoder"].get_session_options().intra_op_num_threads == 2
    # single frames: the encoder session the start-up timing picked, and it says which
    assert one._single_encoder is one.sessions["encoder"] and one.single_frame_threads == 1
    picked = two._single_encoder.get_session_options().intra_op_num_threads
    assert picked == two.single_frame_threads and picked in (1, 2)
    assert (two._single_encoder is two.sessions["encoder"]) == (picked == 2)


def test_the_single_frame_encoder_is_the_faster_of_the_two_timed(exported, keys, monkeypatch):
    _, export = exported
    backend = OnnxBackend(export, "r1", keys[1], threads=2)
    clock = iter(range(10**6))

    def fake_clock():  # the one-thread session's runs take 1 tick, the two-thread session's 3
        return next(clock) * 1.0

    calls = []
    for name, session in (("many", backend.sessions["encoder"]),):
        original = session.run

        def slow_run(*args, _original=original, **kwargs):
            calls.append(name)
            next(clock), next(clock)  # two extra ticks
            return _original(*args, **kwargs)

        monkeypatch.setattr(session, "run", slow_run, raising=False)
    monkeypatch.setattr("cdcca.edge.onnx_model.time.perf_counter", fake_clock)

    chosen = backend._tune_single_frame(rounds=3)

    assert chosen is not backend.sessions["encoder"] and backend.single_frame_threads == 1
    assert len(calls) == 5  # warm-up twice, then the timed rounds


def test_a_batch_of_prompts_about_one_frame_encodes_it_once_and_answers_as_one_by_one(exported, keys, samples):
    """The runtime asks ``[rgb] * n`` (n prompts about the latest frame); the encoder runs on that frame once."""
    _, export = exported
    backend = OnnxBackend(export, "r1", keys[1], threads=1)
    image = samples[0].load_image()
    prompts = [s.prompt for s in samples[:4]]
    batches = []
    encoder = backend.sessions["encoder"]

    class Counting:
        def run(self, outputs, feeds, options):
            batches.append(feeds["pixel_values"].shape[0])
            return encoder.run(outputs, feeds, options)

    backend.sessions["encoder"] = backend._single_encoder = Counting()
    together = backend.answer([image] * len(prompts), prompts)
    alone = [backend.answer([image], [p]) for p in prompts]
    different = backend.answer([image, image.copy()], prompts[:2])  # equal pixels, two frames: encoded as two

    assert batches == [1, 1, 1, 1, 1, 2]
    assert together.texts == [a.texts[0] for a in alone]
    np.testing.assert_allclose(together.sample_entropy, [a.sample_entropy[0] for a in alone], rtol=1e-5)
    assert together.visual_tokens.shape[0] == together.uts_front.shape[0] == len(prompts)
    assert different.texts == [a.texts[0] for a in alone[:2]]


def test_restarts_on_one_state_directory_do_not_pile_up_adapter_files(exported, keys, tmp_path):
    _, export = exported
    files = tmp_path / "state" / "onnx_adapters"
    for _ in range(4):  # no delta ever applied: each start writes the base adapter's files again
        backend = OnnxBackend(export, "r4", keys[1], state_dir=tmp_path / "state", threads=1)
        mapped = {p.name for p in backend._active.files}  # noqa: SLF001
        assert {p.name for p in files.glob("*.onnx_adapter")} == mapped and len(mapped) == len(
            export.manifest["graphs"])  # one file per graph, this run's
        del backend


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda d, m: (d / m["graphs"]["encoder"]["file"]).unlink(), "cannot load .*encoder"),
        (lambda d, m: (d / m["graphs"]["decoder"]["file"]).write_bytes(b"\x08\x01garbage"), "cannot load .*decoder"),
        (lambda d, m: (d / "manifest.json").write_text("[]"), "manifest.json holds JSON but not an object"),
        (lambda d, m: (d / "manifest.json").write_text("{"), "manifest.json is damaged or unreadable"),
    ],
    ids=["graph-missing", "graph-truncated", "manifest-a-list", "manifest-cut"],
)
def test_a_damaged_export_is_an_error_naming_the_file_and_how_to_rebuild(damage, expected, exported, keys, tmp_path):
    import json
    import shutil

    _, export = exported
    copy = tmp_path / "export"
    shutil.copytree(export.directory, copy)
    damage(copy, json.loads((copy / "manifest.json").read_text()))
    with pytest.raises(OnnxModelMismatch, match=expected) as caught:
        OnnxBackend(OnnxExport.load(copy), "r1", keys[1], threads=1)
    assert "cdcca export --backend onnx" in str(caught.value)
