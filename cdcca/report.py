"""Human tables, JSON reports and plots for results (every verb prints a table and can write JSON)."""

from __future__ import annotations

import json
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


def format_table(rows: Sequence[dict], columns: Sequence[str], title: str | None = None) -> str:
    """Rows of dicts as an aligned plain-text table (missing values as ``-``)."""
    cells = [[_cell(row.get(col)) for col in columns] for row in rows]
    widths = [max(len(col), *(len(r[i]) for r in cells)) if cells else len(col) for i, col in enumerate(columns)]
    lines = [title] if title else []
    lines.append("  ".join(col.ljust(w) for col, w in zip(columns, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    return "\n".join(lines)


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
