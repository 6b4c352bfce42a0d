"""UTS on ONNX Runtime (cdcca.edge.onnx_uts): the same variances, kept tokens and kept samples as cdcca.uts on
torch for one dropout mask, a reproducible seeded mask of its own, and no torch import."""

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from cdcca.data.digits_shift import corpus, load_domain
from cdcca.edge import onnx_uts
from cdcca.edge.onnx_backend import OnnxBackend
from cdcca.edge.onnx_export import OnnxExport, OnnxModelMismatch, export_onnx
from cdcca.edge.onnx_uts import OnnxTokenSampler, dropout_keep_mask, log_softmax, sample_entropy, token_entropy
from cdcca.models.checkpoint import build_pair
from cdcca.models.presets import get_preset
from cdcca.models.tokenizer import build_tokenizer
from cdcca.models.trainable import add_lora, trainable_parameters
from cdcca.uts import UncertaintyTokenSampler, UTSConfig

LOGIT_GAIN = 30.0
VARIANCE_RTOL = 1e-5  # float32 graph vs torch eager: observed ~1e-6 of the largest variance


@pytest.fixture(scope="module")
def images():
    return [s.load_image() for d in ("source", "noisy_rotated") for s in load_domain(d, "test", limit=3)]


@pytest.fixture(scope="module")
def tiny_student():
    """An untrained ``tiny`` student (4 vision layers) with LoRA."""
    _, student = build_pair(get_preset("tiny"), build_tokenizer(corpus()), seed=0)
    return add_lora(student).eval()


@pytest.fixture(scope="module")
def tiny_export(tiny_student, tmp_path_factory):
    """The untrained ``tiny`` student exported with two stochastic layers and a float32 UTS graph (what the torch
    sampler computes)."""
    return tiny_student, export_onnx(tiny_student, tmp_path_factory.mktemp("tiny") / "student_onnx", mc_layers=2,
                                     uts_precision="fp32")  # fmt: skip


@pytest.fixture(scope="module")
def tiny_int8_export(tiny_student, tmp_path_factory):
    """The same student exported with the default int8 UTS graph."""
    return tiny_student, export_onnx(tiny_student, tmp_path_factory.mktemp("tiny8") / "student_onnx", mc_layers=2)


@pytest.fixture(scope="module")
def exported_fp32(exported, tmp_path_factory):
    """The pretrained ``test`` student of ``exported`` with a float32 UTS graph."""
    return exported[0], export_onnx(exported[0], tmp_path_factory.mktemp("fp32") / "student_onnx", uts_precision="fp32")


def _torch_masks(config: UTSConfig, layers: int, batch: int, heads: int, tokens: int) -> np.ndarray:
    """The masks ``UncertaintyTokenSampler.token_variance`` draws on its first call (seed chain, then one
    Bernoulli draw of the attention shape per stochastic layer, scaled by 1/(1-p)) as (L, B, M, H, N, N)."""
    generator = torch.Generator().manual_seed(config.seed)
    state = torch.get_rng_state()
    torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
    p, shape = config.mc_dropout, (batch * config.mc_passes, heads, tokens, tokens)
    masks = [(torch.empty(shape).bernoulli_(1 - p) / (1 - p)).numpy() for _ in range(layers)]
    torch.set_rng_state(state)
    return np.stack(masks).reshape(layers, batch, config.mc_passes, heads, tokens, tokens)


def _front(export, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    session = ort.InferenceSession(str(export.directory / export.manifest["graphs"]["encoder"]["file"]))
    visual_tokens, front = session.run(
        ["visual_tokens", export.manifest["uts"]["front_output"]], {"pixel_values": pixels}
    )
    return visual_tokens, front


@pytest.mark.parametrize("case", ["test-1-layer", "tiny-2-layers"])
@pytest.mark.parametrize(("seed", "center"), [(0, "deterministic"), (7, "deterministic"), (7, "mean")])
def test_same_variances_and_kept_tokens_as_torch_for_the_same_mask(case, seed, center, exported_fp32, tiny_export,
                                                                   images):  # fmt: skip
    # Prepare: the real torch sampler, and the mask its seed draws, fed to the float32 ORT graph
    student, export = exported_fp32 if case.startswith("test") else tiny_export
    info = export.manifest["uts"]
    config = UTSConfig(seed=seed, mc_layers=info["mc_layers"], token_keep_ratio=0.4, mc_center=center)
    pixels = student.preprocess(images)
    masks = _torch_masks(config, info["mc_layers"], len(images), info["heads"], info["tokens"])
    sampler = OnnxTokenSampler(export.directory / info["file"], info, config)
    # Execute
    torch_variance, torch_keep = UncertaintyTokenSampler(student, config).stage_two(pixels)
    visual_tokens, front = _front(export, pixels.numpy())
    variance, keep = sampler.stage_two(front, visual_tokens, masks)
    # Assert
    np.testing.assert_allclose(visual_tokens, student.visual_tokens(pixels).detach().numpy(), atol=1e-5)
    scale = float(torch_variance.abs().max())
    assert scale > 0 and variance.shape == tuple(torch_variance.shape)
    np.testing.assert_allclose(variance, torch_variance.numpy(), rtol=VARIANCE_RTOL, atol=VARIANCE_RTOL * scale)
    assert np.array_equal(keep, torch_keep.numpy())
    assert keep.sum(1).tolist() == [round(0.4 * info["tokens"])] * len(images)


def test_its_own_mask_is_seeded_scaled_and_inside_the_model(tiny_export, images):
    student, export = tiny_export
    info = export.manifest["uts"]
    visual_tokens, front = _front(export, student.preprocess(images).numpy())
    samplers = [
        OnnxTokenSampler(export.directory / info["file"], info, UTSConfig(seed=s, mc_layers=2)) for s in (3, 3, 4)
    ]

    runs = [sampler.token_variance(front, visual_tokens) for sampler in samplers]  # the default: sample variance
    mask = OnnxTokenSampler(export.directory / info["file"], info, UTSConfig(seed=3, mc_layers=2)).dropout_keep(64)

    assert np.array_equal(runs[0], runs[1]) and not np.allclose(runs[0], runs[2])  # same seed, same scores
    assert not np.array_equal(runs[0], samplers[0].token_variance(front, visual_tokens))  # the generator moves on
    assert set(np.unique(mask).tolist()) == {0.0, np.float32(1) / np.float32(0.9)}
    assert abs(float((mask == 0).mean()) - 0.1) < 0.005
    assert mask.shape == (2, 64, UTSConfig().mc_passes, info["heads"], info["tokens"], info["tokens"])
    # inside the model: not the closed-form x²·p/(1-p) of dropout on the finished tokens (a magnitude ranking)
    magnitude = (front**2).mean(-1)
    ranks = [np.argsort(np.argsort(v, axis=1), axis=1).ravel() for v in (runs[0], magnitude)]
    assert abs(np.corrcoef(*ranks)[0, 1]) < 0.9


@pytest.mark.parametrize("mode", ["top_fraction", "threshold"])
def test_stage_one_keeps_the_samples_torch_keeps(mode, spread_export, keys, samples_for_stage_one):
    # Prepare: ORT answers (entropy from the decoder's logits) and the torch sampler scoring the same samples
    student, export = spread_export
    _, trust = keys
    probe = UncertaintyTokenSampler(student, UTSConfig())
    entropies = [float(probe.score([s]).sample_entropy[0]) for s in samples_for_stage_one]
    threshold = float(np.median(entropies))  # inside the spread, whatever the perturbed student's entropies are
    config = UTSConfig(sample_mode=mode, entropy_threshold=threshold, sample_fraction=0.5, window=6)
    backend = OnnxBackend(export, "r1", trust, threads=1)
    torch_sampler = UncertaintyTokenSampler(student, config)
    sampler = backend.token_sampler(config)
    torch_keep, ort_keep, gaps = [], [], []
    for sample in samples_for_stage_one:
        # Execute
        scores = torch_sampler.score([sample])
        answer = backend.answer([sample.load_image()], [sample.prompt])
        entropy = answer.sample_entropy  # (1,) float32, numpy
        _, front = _front(export, backend._pixel_values([sample.load_image()]))
        assert np.array_equal(answer.uts_front, front)  # what stage 2 starts from comes with the answer
        torch_keep.append(bool(scores.keep_sample[0]))
        ort_keep.append(bool(sampler.keep_samples(entropy, [sample.prompt])[0]))
        gaps.append(abs(float(entropy[0]) - float(scores.sample_entropy[0])))
    # Assert
    assert max(gaps) < 1e-4
    assert ort_keep == torch_keep and 0 < sum(ort_keep) < len(ort_keep)


@pytest.fixture(scope="module")
def spread_export(exported, tmp_path_factory):
    """The pretrained ``test`` student with a seeded perturbation of its trainable set, exported.

    The briefly pretrained student answers almost uniformly (every entropy 4.797 nats within 1e-6), so a window
    ranking would compare float rounding, which two engines do not share: a perturbation and a larger final
    norm spread the entropies (0.7-1.6 nats at rank 8)."""
    student = copy.deepcopy(exported[0])
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in trainable_parameters(student).items():
            param.add_(0.5 * torch.randn(param.shape, generator=generator))
            if name.endswith("decoder.final_layer_norm.weight"):
                param.mul_(LOGIT_GAIN)  # sharper answer distributions
    return student, export_onnx(student, tmp_path_factory.mktemp("spread") / "student_onnx")


@pytest.fixture(scope="module")
def samples_for_stage_one():
    return [s for d in ("source", "printed", "rephrased") for s in load_domain(d, "test", limit=5)]


def test_sample_entropy_from_logits_is_eq_2():
    logits = [np.array([[0.0, 0.0], [10.0, -10.0]], np.float32), np.array([[5.0, 0.0], [0.0, 0.0]], np.float32)]
    alive = np.array([[1, 1], [1, 0]], np.float32)  # the second answer ended at its first token

    steps = np.stack([token_entropy(log_softmax(step)) for step in logits], 1)  # (B, T)
    entropy = sample_entropy(steps, alive)

    p = 1 / (1 + np.exp(-5.0))
    expected_first = (np.log(2) + -(p * np.log(p) + (1 - p) * np.log(1 - p))) / 2
    np.testing.assert_allclose(entropy, [expected_first, 0.0], atol=1e-6)


def test_mismatched_settings_are_clear_errors(exported, tiny_export, keys, tmp_path):
    _, export = exported
    older = OnnxExport(export.directory, {k: v for k, v in export.manifest.items() if k != "uts"})
    backend = OnnxBackend(older, "r1", keys[1])
    assert backend.answer([np.zeros((24, 24, 3), np.uint8)], ["what digit is this?"]).uts_front is None
    with pytest.raises(OnnxModelMismatch, match="no UTS graph"):
        backend.token_sampler(UTSConfig())
    info = export.manifest["uts"]
    with pytest.raises(ValueError, match="export again with mc_layers=2"):
        OnnxTokenSampler(export.directory / info["file"], info, UTSConfig(mc_layers=2))
    sampler = OnnxTokenSampler(export.directory / info["file"], info, UTSConfig())
    with pytest.raises(ValueError, match="uts_front must be"):
        sampler.token_variance(np.zeros((1, info["tokens"] + 1, info["width"]), np.float32))
    front = np.zeros((1, info["tokens"], info["width"]), np.float32)
    centred = OnnxTokenSampler(export.directory / info["file"], info, UTSConfig(mc_center="deterministic"))
    with pytest.raises(ValueError, match="pass the answer's visual_tokens as center"):
        centred.token_variance(front)
    with pytest.raises(ValueError, match="center must be the visual tokens of the same frames"):
        sampler.token_variance(front, np.zeros((2, info["tokens"], info["width"]), np.float32))
    with pytest.raises(ValueError, match="mc_center must be one of"):
        UTSConfig(mc_center="median")
    with pytest.raises(ValueError, match="mc_layers must be in 1..4"):
        export_onnx(tiny_export[0], export.directory.parent / "bad", mc_layers=5)


@pytest.mark.parametrize("module", ["onnx_uts", "onnx_model"])
def test_the_robot_modules_import_no_torch(module):
    """Loaded by path: ``cdcca.edge``'s package __init__ still imports the torch runtime (see issue 19)."""
    path = Path(onnx_uts.__file__).with_name(f"{module}.py")
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location({module!r}, {str(path)!r})\n"
        f"module = sys.modules[{module!r}] = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes', 'onnx') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("mode", ["top_fraction", "threshold"])
def test_stage_one_decisions_equal_torch_on_the_same_entropies(mode, exported):
    # Prepare: entropies with exact ties, three prompt kinds, a window shorter than the stream
    student, export = exported
    config = UTSConfig(sample_mode=mode, entropy_threshold=1.0, sample_fraction=0.3, window=5, group_words=2)
    rng = np.random.default_rng(0)
    entropy = rng.choice(np.linspace(0.5, 1.5, 9, dtype=np.float32), 60)  # ties on purpose
    prompts = [rng.choice(["what digit is it?", "describe the image.", "is the digit odd?"]) for _ in entropy]
    torch_sampler = UncertaintyTokenSampler(student, config)
    sampler = OnnxTokenSampler(export.directory / "uts.onnx", export.manifest["uts"], config)
    # Execute: batches of 4, as an answering loop would
    expected = [
        torch_sampler.keep_samples(torch.from_numpy(entropy[i : i + 4]), prompts[i : i + 4]) for i in range(0, 60, 4)
    ]
    got = [sampler.keep_samples(entropy[i : i + 4], prompts[i : i + 4]) for i in range(0, 60, 4)]
    # Assert
    assert np.array_equal(np.concatenate(got), torch.cat(expected).numpy())
    assert 0 < np.concatenate(got).sum() < 60
    assert set(sampler._recent) == (set(torch_sampler._recent) if mode == "top_fraction" else set())


def test_cdcca_export_writes_the_uts_graph(pretrained_test_pair, tmp_path, capsys):
    from types import SimpleNamespace

    from cdcca.edge.onnx_export import cli_export

    args = SimpleNamespace(
        preset="test", checkpoints=pretrained_test_pair, out=tmp_path / "onnx", json=None, mc_layers=1
    )
    fp32 = SimpleNamespace(**{**vars(args), "out": tmp_path / "fp32", "uts_precision": "fp32"})

    report = cli_export(args)
    cli_export(fp32)

    assert set(report["graph_bytes"]) == {"encoder", "decoder", "uts"} and report["graph_bytes"]["uts"] > 1000
    assert OnnxExport.load(tmp_path / "onnx").manifest["uts"]["mc_layers"] == 1
    assert OnnxExport.load(tmp_path / "onnx").manifest["uts"]["precision"] == "int8"  # the default
    assert OnnxExport.load(tmp_path / "fp32").manifest["uts"]["precision"] == "fp32"
    assert "uts.onnx" in capsys.readouterr().out


@pytest.mark.parametrize("center", ["mean", "deterministic"])
def test_the_torch_tail_fed_the_seeded_mask_scores_as_the_graph(center, tiny_export, images):
    """One seed, one mask, both engines: what a torch robot needs to pick the ORT robot's tokens."""
    from cdcca.edge.onnx_export import MCDropoutTail

    student, export = tiny_export
    info = export.manifest["uts"]
    config = UTSConfig(seed=21, mc_layers=2, mc_center=center)
    visual_tokens, front = _front(export, student.preprocess(images).numpy())
    sampler = OnnxTokenSampler(export.directory / info["file"], info, config)
    shape = (2, len(images), config.mc_passes, info["heads"], info["tokens"], info["tokens"])
    mask = dropout_keep_mask(np.random.default_rng(config.seed), shape, config.mc_dropout)

    variance, keep = sampler.stage_two(front, visual_tokens)  # its own first mask: the same draw
    with torch.no_grad():
        outputs = MCDropoutTail(student, 2)(*map(torch.from_numpy, (front, mask, visual_tokens)))
        torch_variance = outputs[("mean", "deterministic").index(center)].numpy()

    scale = float(np.abs(torch_variance).max())
    np.testing.assert_allclose(variance, torch_variance, rtol=VARIANCE_RTOL, atol=VARIANCE_RTOL * scale)
    assert np.array_equal(keep, sampler.keep_tokens(torch_variance))


def _strict_decisions(entropy: np.ndarray, prompts: list, config: UTSConfig, kind) -> list[bool]:
    """Stage 1 without a tie tolerance (``>`` on the raw floats), as the decisions were made before it."""
    from collections import deque

    recent, keep = {}, []
    for value, prompt in zip(entropy.tolist(), prompts):
        if config.sample_mode == "threshold":
            keep.append(value > config.entropy_threshold)
            continue
        window = recent.setdefault(kind(prompt), deque(maxlen=config.window))
        window.append(value)
        keep.append(
            int((np.asarray(window) > value).sum()) < max(1, int(np.ceil(config.sample_fraction * len(window))))
        )
    return keep


@pytest.mark.parametrize("mode", ["top_fraction", "threshold"])
def test_stage_one_near_ties_are_decided_as_ties(mode, exported):
    """Two engines round a sample's entropy differently (torch vs ORT: up to ~1e-6 nats on the tiny student), so
    entropies within ``uts_config.entropy_tolerance`` count as equal: the other engine's copy of a stream, each value
    moved by up to 2e-6 nats, is kept exactly as the stream itself, where raw ``>`` decides differently."""
    from cdcca.uts_config import ENTROPY_TIE_ATOL, above, entropy_tolerance, window_rank

    # Prepare: exact ties (and values on the threshold), and the same stream as the other engine would compute it
    _, export = exported
    config = UTSConfig(sample_mode=mode, entropy_threshold=1.0, sample_fraction=0.3, window=5, group_words=2)
    rng = np.random.default_rng(1)
    entropy = rng.choice(np.linspace(0.5, 1.5, 9), 80)  # ties on purpose; 1.0 sits on the threshold
    prompts = [str(rng.choice(["what digit is it?", "describe the image.", "is the digit odd?"])) for _ in entropy]
    other = entropy + rng.uniform(-2e-6, 2e-6, entropy.shape)
    samplers = [OnnxTokenSampler(export.directory / "uts.onnx", export.manifest["uts"], config) for _ in range(2)]

    # Execute
    kept, kept_other = (sampler.keep_samples(values, prompts) for sampler, values in zip(samplers, (entropy, other)))

    # Assert: the same samples, though raw comparisons on the two copies disagree
    assert np.array_equal(kept, kept_other) and 0 < kept.sum() < len(kept)
    strict = _strict_decisions(entropy, prompts, config, samplers[0].prompt_kind)
    strict_other = _strict_decisions(other, prompts, config, samplers[0].prompt_kind)
    assert strict != strict_other  # without the tolerance these rounding differences flip decisions
    assert kept.tolist() == strict  # and with it, exact ties decide as they always did
    # the tolerance itself: 1e-6 apart is a tie, 1e-3 apart is not
    assert window_rank([1.0 + 1e-6, 1.0], 1.0) == 0 and window_rank([1.0 + 1e-3, 1.0], 1.0) == 1
    assert not above(1.0 + 1e-6, 1.0) and above(1.0 + 1e-3, 1.0)
    assert ENTROPY_TIE_ATOL <= entropy_tolerance(2.0) < 1e-4


def test_one_sample_runs_on_the_session_that_timed_faster(exported, images):
    _, export = exported
    info = export.manifest["uts"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    sampler = OnnxTokenSampler(export.directory / info["file"], info, UTSConfig(), options)
    single = OnnxTokenSampler(export.directory / info["file"], info, UTSConfig(), _one_thread())
    front = np.random.default_rng(0).standard_normal((1, info["tokens"], info["width"])).astype(np.float32)

    picked = sampler._single.get_session_options().intra_op_num_threads
    assert picked == sampler.single_sample_threads and picked in (1, 2)
    assert (sampler._single is sampler.session) == (picked == 2)
    assert single._single is single.session and single.single_sample_threads == 1  # one thread: nothing to time
    np.testing.assert_allclose(sampler.token_variance(front, front), single.token_variance(front, front),
                               rtol=1e-6)  # same seed


def test_the_spread_is_measured_around_the_dropout_free_tokens_the_robot_answered_with(tiny_export, images):
    """``center`` is the encoder graph's ``visual_tokens``: with nothing dropped every pass is exactly that output,
    so the spread is zero, while the sample variance of the same passes is zero with any centre; with dropout the
    spread around it is at least the passes' (M-1)/M sample variance (a mean squared deviation is smallest around
    the mean), and close to it (the dropout-free output is near the passes' mean)."""
    student, export = tiny_export
    info = export.manifest["uts"]
    visual_tokens, front = _front(export, student.preprocess(images).numpy())
    graph = ort.InferenceSession(str(export.directory / info["file"]))
    passes = 7
    shape = (2, len(images), passes, info["heads"], info["tokens"], info["tokens"])

    ones = {"uts_front": front, "center": visual_tokens, "dropout_keep": np.ones(shape, np.float32)}
    variance_0, spread_0 = graph.run(["token_variance", "token_spread"], ones)
    mask = dropout_keep_mask(np.random.default_rng(5), shape, 0.1)
    variance, spread = graph.run(["token_variance", "token_spread"], {**ones, "dropout_keep": mask})

    scale = float(spread.max())
    assert scale > 0 and float(np.abs(spread_0).max()) < 1e-6 * scale and float(np.abs(variance_0).max()) < 1e-6 * scale
    assert np.all(spread >= (passes - 1) / passes * variance * (1 - 1e-4))
    assert float(np.median(spread / ((passes - 1) / passes * variance))) < 1.5



def _one_thread():
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return options


# ------------------------------------------------------------------------------------------------ int8 stage 2
INT8_RTOL = 2e-2  # int8 graph vs its torch emulation: most samples agree to float32 rounding (~5e-7 of their largest
# variance); in some, a float32 difference upstream flips an input's rounding to the neighbouring uint8 level (up to
# ~7e-3, as moving the emulation's own input by one ulp does), which swaps a boundary token in 0-3 % of a pretrained
# student's samples (3 of 18 on this untrained one with two stochastic layers)


def test_the_int8_op_is_what_the_torch_emulation_computes():
    """A float32 MatMul by a weight, rewritten by :func:`int8_matmuls`, against :func:`int8_linear`: the same
    numbers to the bit (integer products, the same range, zero point and rounding)."""
    from onnx import TensorProto, helper, numpy_helper

    from cdcca.edge.onnx_export import int8_linear, int8_matmuls

    rng = np.random.default_rng(0)
    linear = torch.nn.Linear(512, 96, bias=False)
    x = (0.7 * rng.standard_normal((1, 300, 512)) + 0.2).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph(
        [node], "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(linear.weight.detach().numpy().T.copy(), "w")])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    assert int8_matmuls(model) == 1
    session = ort.InferenceSession(model.SerializeToString(), _one_thread())
    expected = session.run(None, {"x": x})[0]
    with torch.no_grad():
        emulated = int8_linear(linear, torch.from_numpy(x)).numpy()

    assert [n.op_type for n in model.graph.node] == ["DynamicQuantizeMatMul"]
    assert {t.name for t in model.graph.initializer} == {"w_int8", "w_scale", "w_zero"}  # the float weight is gone
    assert np.array_equal(emulated, expected)
    assert float(np.abs(emulated - x @ linear.weight.detach().numpy().T).max()) > 0  # it is not float32


def test_the_default_uts_graph_runs_its_linear_layers_in_int8(tiny_int8_export, tiny_export):
    import onnx

    _, int8 = tiny_int8_export
    exports = {"int8": int8, "fp32": tiny_export[1]}
    graphs = {e: onnx.load(str(x.directory / x.manifest["uts"]["file"])) for e, x in exports.items()}
    ops = {e: [n.op_type for n in g.graph.node] for e, g in graphs.items()}

    assert int8.manifest["uts"]["precision"] == "int8" and tiny_export[1].manifest["uts"]["precision"] == "fp32"
    assert ops["int8"].count("DynamicQuantizeMatMul") == 8  # qkv, projection, fc1, fc2 of two layers
    assert ops["fp32"].count("DynamicQuantizeMatMul") == 0
    assert ops["int8"].count("MatMul") == ops["fp32"].count("MatMul") - 8  # attention stays float32
    weights = {e: sum(len(t.raw_data) for t in g.graph.initializer) for e, g in graphs.items()}
    assert weights["int8"] < 0.3 * weights["fp32"]


@pytest.mark.parametrize("center", ["mean", "deterministic"])
def test_the_int8_graph_scores_as_the_torch_tail_in_int8(center, tiny_int8_export, tiny_export, images):
    """One seed, one mask: the int8 graph against ``MCDropoutTail(precision="int8")``, and against float32."""
    from cdcca.edge.onnx_export import MCDropoutTail

    student, export = tiny_int8_export
    info = export.manifest["uts"]
    config = UTSConfig(seed=21, mc_layers=2, mc_center=center)
    visual_tokens, front = _front(export, student.preprocess(images).numpy())
    sampler = OnnxTokenSampler(export.directory / info["file"], info, config)
    fp32 = OnnxTokenSampler(tiny_export[1].directory / info["file"], info, config)
    shape = (2, len(images), config.mc_passes, info["heads"], info["tokens"], info["tokens"])
    mask = dropout_keep_mask(np.random.default_rng(config.seed), shape, config.mc_dropout)

    variance, keep = sampler.stage_two(front, visual_tokens)  # its own first mask: the same draw
    with torch.no_grad():
        outputs = MCDropoutTail(student, 2, "int8")(*map(torch.from_numpy, (front, mask, visual_tokens)))
        torch_variance = outputs[("mean", "deterministic").index(center)].numpy()
    float_variance, float_keep = fp32.stage_two(front, visual_tokens, mask)

    scale = np.abs(torch_variance).max(axis=1, keepdims=True)  # per sample
    relative = np.abs(variance - torch_variance) / scale
    assert float(np.median(relative.max(axis=1))) < 1e-5  # most samples: float32 rounding
    assert float(relative.max()) < INT8_RTOL  # the rest: a flipped uint8 level here and there
    swapped = (keep != sampler.keep_tokens(torch_variance)).sum(axis=1)
    assert int(swapped.max()) <= 2 and float((swapped == 0).mean()) >= 0.75  # at most one boundary swap a sample
    assert not np.allclose(variance, float_variance, rtol=1e-4)  # int8 is not float32 ...
    assert float((keep == float_keep).mean()) > 0.85  # ... but ranks the tokens about as float32 does


def test_an_int8_graph_scores_each_sample_as_if_it_ran_alone(tiny_int8_export, images):
    """An int8 graph quantizes a layer's input over the run, so the sampler runs one sample at a time: a sample's
    scores do not depend on what else was kept with it."""
    student, export = tiny_int8_export
    info = export.manifest["uts"]
    sampler = OnnxTokenSampler(export.directory / info["file"], info, UTSConfig(mc_layers=2), _one_thread())
    visual_tokens, front = _front(export, student.preprocess(images).numpy())
    mask = sampler.dropout_keep(len(images))

    together = sampler.token_variance(front, visual_tokens, mask)
    alone = [
        sampler.token_variance(front[i : i + 1], visual_tokens[i : i + 1], np.ascontiguousarray(mask[:, i : i + 1]))
        for i in range(len(images))
    ]
    in_one_run = sampler.session.run(["token_variance"], {"uts_front": front, "center": visual_tokens,
                                                          "dropout_keep": mask})[0]  # fmt: skip

    assert np.array_equal(together, np.concatenate(alone))
    assert not np.array_equal(together, in_one_run)  # what one batched run would have given


def test_an_export_without_a_precision_is_float32(exported_fp32):
    _, export = exported_fp32
    info = {k: v for k, v in export.manifest["uts"].items() if k != "precision"}  # an export before int8 stage 2
    assert OnnxTokenSampler(export.directory / info["file"], info, UTSConfig()).precision == "fp32"
    with pytest.raises(ValueError, match="uts_precision must be one of"):
        export_onnx(exported_fp32[0], export.directory.parent / "bad", uts_precision="fp16")
