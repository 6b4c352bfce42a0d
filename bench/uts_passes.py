"""How many MC-dropout passes UTS stage 2 needs: the kept tokens at M passes against a many-pass reference.

UTS stage 2 (Wang et al., CVPR 2024, Eq. 3-4) ranks a sample's visual tokens by the variance of their last-layer
outputs over M stochastic passes and keeps the top ratio. The variance is estimated from M draws, so the kept
set is itself random. This script measures how much of the kept set at M passes agrees with the set a
``--reference``-pass sample variance keeps (the low-noise answer), against random tokens, per domain, for both
estimators of ``UTSConfig.mc_center``: the passes' sample variance (``mean``, M - 1 degrees of freedom) and their
mean squared deviation from the dropout-free output the robot already has (``deterministic``, M). It is the
trade-off behind the default M (``bench/edge.md``: stage 2's cost is linear in M and decides the robot's UTS
budget).

It runs the robot's own ``uts.onnx`` (ONNX Runtime, the exported tiny student) on the encoder's ``uts_front``
of test frames, with the seeded masks of :func:`cdcca.edge.onnx_uts.dropout_keep_mask`, in both precisions of
the export (``int8``, the default, and ``fp32``; the reference is always float32), and checks the int8 graph
against its torch emulation (``MCDropoutTail(precision="int8")``) on the same masks.

    python bench/uts_passes.py --json bench/results/uts_passes.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

CENTRES = ("mean", "deterministic")  # UTSConfig.mc_center: the passes' own mean, or the dropout-free output
PRECISIONS = ("fp32", "int8")  # export_onnx(uts_precision=...)


def _kept(variance: np.ndarray, ratio: float) -> np.ndarray:
    """(B, N) variances -> (B, k) indices of the top ``ratio`` tokens (UTS's ``ratio`` mode)."""
    count = max(1, int(round(ratio * variance.shape[1])))
    return np.argsort(-variance, axis=1, kind="stable")[:, :count]


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean share of the kept indices ``a`` (B, k) that ``b`` (B, k) keeps too."""
    return float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a.tolist(), b.tolist())]))


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the tiny preset's)")
    parser.add_argument("--domains", nargs="+", default=["source", "colour_inverted", "printed", "noisy_rotated"])
    parser.add_argument("--images", type=int, default=60, help="test frames per domain")
    parser.add_argument("--passes", type=int, nargs="+", default=[6, 7, 8, 16])
    parser.add_argument("--reference", type=int, default=128, help="passes of the reference estimate")
    parser.add_argument("--draws", type=int, default=5, help="independent M-pass estimates per frame")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the mask generator")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import onnxruntime as ort
    import torch

    from cdcca.data.digits_shift import load_domain
    from cdcca.edge.onnx_export import MCDropoutTail, export_onnx
    from cdcca.edge.onnx_uts import OnnxTokenSampler, dropout_keep_mask
    from cdcca.models.checkpoint import load_mllm
    from cdcca.models.trainable import add_lora
    from cdcca.paths import checkpoint_dir
    from cdcca.report import format_table, progress_bar
    from cdcca.uts_config import UTSConfig

    uts = UTSConfig()
    model = args.model or checkpoint_dir("tiny")
    student = add_lora(load_mllm(model / "student"))
    with tempfile.TemporaryDirectory() as work:
        exports = {p: export_onnx(student, Path(work) / p, uts_precision=p) for p in PRECISIONS}
        export = exports["fp32"]
        info = export.manifest["uts"]
        options = ort.SessionOptions()
        options.log_severity_level = 3  # the export's overridable initializers would warn once each
        encoder = ort.InferenceSession(str(export.directory / export.manifest["graphs"]["encoder"]["file"]), options)
        samplers = {p: OnnxTokenSampler(x.directory / info["file"], x.manifest["uts"], uts, options)
                    for p, x in exports.items()}  # the robot's runs (an int8 graph: one sample per run)
        emulation = MCDropoutTail(student, info["mc_layers"], "int8")
        rows = []
        for domain in progress_bar(args.domains, desc="domains"):
            images = [s.load_image() for s in load_domain(domain, "test", limit=args.images)]
            center, front = encoder.run(["visual_tokens", info["front_output"]],
                                        {"pixel_values": student.preprocess(images).numpy()})  # fmt: skip
            row = {"domain": domain}
            per_seed: dict[str, list[float]] = {f"{p}-{c}-{m}": [] for p in PRECISIONS for c in CENTRES
                                                for m in args.passes}  # fmt: skip
            per_seed["random"], per_seed["int8-vs-emulation"] = [], []
            for seed in args.seeds:
                rng = np.random.default_rng(seed)

                def mask_of(passes: int) -> np.ndarray:
                    shape = (info["mc_layers"], len(front), passes, info["heads"], info["tokens"], info["tokens"])
                    return dropout_keep_mask(rng, shape, uts.mc_dropout)

                def scores(precision: str, mask: np.ndarray) -> dict[str, np.ndarray]:
                    return dict(zip(CENTRES, samplers[precision].run_graph(front, center, mask)))

                reference = _kept(scores("fp32", mask_of(args.reference))["mean"], uts.token_keep_ratio)
                for passes in args.passes:
                    for precision in PRECISIONS:
                        draws = [scores(precision, mask_of(passes)) for _ in range(args.draws)]
                        for c in CENTRES:
                            overlaps = [_overlap(_kept(d[c], uts.token_keep_ratio), reference) for d in draws]
                            per_seed[f"{precision}-{c}-{passes}"].append(float(np.mean(overlaps)))
                random = np.stack([rng.permutation(info["tokens"])[: reference.shape[1]] for _ in reference])
                per_seed["random"].append(_overlap(random, reference))
                mask = mask_of(uts.mc_passes)  # the int8 graph against its torch emulation, one mask
                with torch.no_grad():
                    emulated = emulation(*map(torch.from_numpy, (front, mask, center)))[0].numpy()
                same = _kept(scores("int8", mask)["mean"], uts.token_keep_ratio)
                per_seed["int8-vs-emulation"].append(_overlap(same, _kept(emulated, uts.token_keep_ratio)))
            for name, values in per_seed.items():
                row[name] = {"mean": float(np.mean(values)), "min": float(np.min(values)), "per_seed": values}
            rows.append(row)
    report = {"config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                         "model": str(model), "token_keep_ratio": uts.token_keep_ratio, "mc_dropout": uts.mc_dropout,
                         "mc_layers": info["mc_layers"]},
              "rows": rows}  # fmt: skip
    names = [*(f"{p}-{c}-{m}" for p in PRECISIONS for c in CENTRES for m in args.passes), "random",
             "int8-vs-emulation"]
    table = [{"estimate": n, **{r["domain"]: f"{100 * r[n]['mean']:.1f} ({100 * r[n]['min']:.1f})" for r in rows}}
             for n in names]  # fmt: skip
    print(f"kept tokens shared with a {args.reference}-pass sample variance, % (worst seed), "
          f"{uts.token_keep_ratio:.0%} of {info['tokens']} kept; estimate = precision-centre-M; int8-vs-emulation: "
          f"the int8 graph's kept tokens shared with its torch emulation's, {uts.mc_passes} passes, one mask")
    print(format_table(table, ["estimate", *(r["domain"] for r in rows)]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
        print(f"report: {args.json}")
    return report


if __name__ == "__main__":
    main()
