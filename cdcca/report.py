"""Human tables, JSON reports and plots for results (every verb prints a table and can write JSON)."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from tqdm.auto import tqdm


def progress_bar(iterable: Iterable, **kwargs) -> tqdm:
    """A tqdm bar; redrawn at most every 2 s when stderr is a log file rather than a terminal."""
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", 2.0)
    return tqdm(iterable, **kwargs)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


MAX_TABLE_WIDTH = 120  # issue 17: every table fits a 120-column terminal


def format_table(
    rows: Sequence[dict],
    columns: Sequence[str],
    title: str | None = None,
    headers: dict[str, str] | None = None,
    max_width: int = MAX_TABLE_WIDTH,
) -> str:
    """Rows of dicts as an aligned plain-text table (missing values as ``-``) at most ``max_width`` wide.

    Args:
        rows: one dict per row; ``columns`` picks and orders the keys shown.
        title: a line above the table (cut to ``max_width``).
        headers: short labels for some columns (``{"student_acc_before": "acc before"}``).
        max_width: when the table is wider, headers wrap onto more lines (at ``_``, ``-`` and spaces), then the
            widest text cells are cut with ``...``, then the last columns are left out with a note naming them
            (the JSON report keeps everything).
    """
    labels = [(headers or {}).get(col, col) for col in columns]
    cells = [[_cell(row.get(col)) for col in columns] for row in rows]
    data_widths = [max((len(r[i]) for r in cells), default=1) for i in range(len(columns))]
    words = [_header_words(label) for label in labels]
    widths = [max(len(label), data) for label, data in zip(labels, data_widths)]

    def total(ws: Sequence[int]) -> int:
        return sum(ws) + 2 * max(0, len(ws) - 1)

    floors = [max(data, *(len(w) for w in ws)) for data, ws in zip(data_widths, words)]
    while total(widths) > max_width:  # 1. wrap the widest headers, down to their longest word
        wrappable = [i for i in range(len(widths)) if widths[i] > floors[i]]
        if not wrappable:
            break
        widest = max(wrappable, key=widths.__getitem__)
        widths[widest] -= 1
    wrapped = _wrap_headers(words, widths)  # a wrapped column needs only its longest header line
    widths = [max(data, *(len(line[i]) for line in wrapped)) for i, data in enumerate(data_widths)]
    while total(widths) > max_width:  # 2. cut the widest column, down to 8 characters
        widest = max(range(len(widths)), key=widths.__getitem__)
        if widths[widest] <= 8:
            break
        widths[widest] -= 1
    dropped: list[str] = []
    while total(widths) > max_width and len(widths) > 1:  # 3. leave out the last columns
        widths.pop()
        dropped.insert(0, labels[len(widths)])
    shown = len(widths)
    header_lines = _wrap_headers([words[i] for i in range(shown)], widths)
    lines = [_cut(title, max_width)] if title else []
    lines += ["  ".join(part.ljust(w) for part, w in zip(line, widths)).rstrip() for line in header_lines]
    lines.append("  ".join("-" * w for w in widths))
    for r in cells:
        parts = [_cut(c, w) for c, w in zip(r[:shown], widths)]
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(parts, widths))))
    if dropped:
        lines.append(_cut(f"({len(dropped)} more columns in the JSON report: {', '.join(dropped)})", max_width))
    return "\n".join(line.rstrip() for line in lines)


def _header_words(label: str) -> list[str]:
    """``student_acc_before`` -> ``["student_", "acc_", "before"]``: pieces a header may wrap between."""
    return re.findall(r"[^_\- ]+[_\- ]?|[_\- ]", label) or [label]


def _wrap_headers(words: list[list[str]], widths: list[int]) -> list[list[str]]:
    """Each header greedily wrapped into its column; all headers get as many lines as the tallest."""
    wrapped = []
    for pieces, width in zip(words, widths):
        lines, current = [], ""
        for piece in pieces:
            if current and len(current + piece.rstrip()) > width:
                lines.append(current.rstrip())
                current = ""
            current += piece
        lines.append(_cut(current.rstrip(), width))
        wrapped.append(lines)
    height = max((len(lines) for lines in wrapped), default=1)
    return [[lines[k] if k < len(lines) else "" for lines in wrapped] for k in range(height)]


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 3)] + "..."


ENVIRONMENT_PACKAGES = ("torch", "transformers", "peft", "numpy", "pillow", "scikit-learn", "onnxruntime")


def cpu() -> dict:
    """The CPU's model name and which bfloat16 matrix units it has (``amx``, ``avx512_bf16`` or ``none``; ``None``
    where unknown), from ``/proc/cpuinfo`` (the flags torch's own probes read; no torch import, so the torch-free robot
    and a verb's wall time are unaffected): a bfloat16 ``cdcca pretrain`` takes other kernels on each, and two CPUs
    with the same packages built two pairs, in float32 too (``bench/results/adapt_avx512bf16.json``)."""
    import platform

    model, units = None, None
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    for line in info.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model is None:
            model = value.strip()
        elif key.strip() == "flags" and units is None:
            flags = set(value.split())
            units = "amx" if "amx_tile" in flags else "avx512_bf16" if "avx512_bf16" in flags else "none"
    return {"model": model or platform.processor() or None, "bf16_units": units}


def environment() -> dict:
    """What a figure was measured with: Python, the platform, the CPU (:func:`cpu`), its count and the versions of the
    packages that can change numbers (torch's kernels; transformers builds and initialises the models; Pillow renders
    the digits-shift images), and with them every checkpoint ``cdcca pretrain`` builds."""
    import os
    import platform
    from importlib import metadata

    versions = {}
    for name in ENVIRONMENT_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu(), "cpus": os.cpu_count(),
            "packages": versions}  # fmt: skip


def checkpoint_fingerprint(directory: str | Path) -> dict[str, str | None]:
    """The first 16 hex digits of the SHA-256 of each model's weights under a ``cdcca pretrain`` folder (``teacher``,
    ``student``), so two reports can tell whether they were measured on the same checkpoint."""
    import hashlib

    prints: dict[str, str | None] = {}
    for model in ("teacher", "student"):
        weights = Path(directory) / model / "model.safetensors"
        if not weights.is_file():
            prints[model] = None
            continue
        with weights.open("rb") as file:  # read in chunks: a real checkpoint's weights need not fit in memory twice
            prints[model] = hashlib.file_digest(file, "sha256").hexdigest()[:16]
    return prints


def write_json(report: dict, path: str | Path) -> Path:
    """Write ``report`` as indented JSON, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    return path


def plot_domain_accuracy(scores: dict[str, list[dict]], path: str | Path, title: str) -> Path:
    """Grouped bars: accuracy per domain (x) for each model (bars). ``scores``: model -> DomainScore dicts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(scores)
    domains = [row["domain"] for row in scores[models[0]]]
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(1.6 * len(domains) + 2, 3.6))
    for k, model in enumerate(models):
        values = [row["accuracy"] or 0.0 for row in scores[model]]
        xs = [i + (k - (len(models) - 1) / 2) * width for i in range(len(domains))]
        bars = ax.bar(xs, values, width, label=model)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(range(len(domains)), domains, rotation=15)
    ax.set_ylabel("accuracy (%) = mean of VQA and MC")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, path)


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Lay out, write as PNG (creating the folder) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
