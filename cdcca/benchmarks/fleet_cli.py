"""The options of ``cdcca bench fleet``; imports nothing but argparse, so ``cdcca --help`` stays fast."""

from __future__ import annotations

import argparse
from pathlib import Path


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {value}")
    return value


def _postgresql_url(text: str) -> str:
    """``--store``: the workers share a PostgreSQL server; any other text (``mysql://x``) made a SQLite file of that
    name, which two workers cannot share."""
    if not text.startswith(("postgresql://", "postgres://")):
        raise argparse.ArgumentTypeError(f"expected a postgresql:// URL (leave it out for a SQLite file per worker "
                                         f"count), got {text!r}")  # fmt: skip
    return text


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def add_fleet_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the fleet benchmark's own options to its ``bench fleet`` sub-parser (defaults: the committed run's)."""
    parser.add_argument("--robots", type=_positive_int, nargs="+", default=[1, 8, 32, 128], metavar="N",
                        help="fleet sizes to measure")  # fmt: skip
    parser.add_argument("--workers", type=_positive_int, nargs="+", default=[1, 2], metavar="N",
                        help="cloud worker counts to measure")  # fmt: skip
    parser.add_argument("--store", type=_postgresql_url, default=None, metavar="URL",
                        help="postgresql:// URL the workers share (default: a SQLite file)")  # fmt: skip
    parser.add_argument("--workdir", type=Path, default=None, metavar="DIR",
                        help="state, logs and child specs of the run (default: a fresh temporary folder)")  # fmt: skip
    parser.add_argument("--round-size", type=_positive_int, default=4, help="samples that make a round")
    parser.add_argument("--steps", type=_positive_int, default=None, help="AKD optimizer steps per round (default: 3)")
    parser.add_argument("--saturation-rounds", type=_positive_int, default=1, metavar="N",
                        help="rounds per robot in the saturation phase")  # fmt: skip
    parser.add_argument("--load", type=_share, default=0.5, metavar="SHARE",
                        help="offered load of the latency phase, a share of the saturation throughput")  # fmt: skip
    parser.add_argument("--latency-rounds", type=_positive_int, default=16, metavar="N",
                        help="rounds measured per fleet size in the latency phase at least")  # fmt: skip
    parser.add_argument("--latency-robots", type=_positive_int, nargs="+", default=None, metavar="N",
                        help="fleet sizes of the latency phase (default: --robots)")  # fmt: skip
    parser.add_argument("--kill-robots", type=int, default=8, metavar="N",
                        help="robots of the phase where a worker is killed mid-round (0: no such phase)")  # fmt: skip
    parser.add_argument("--speedup-pairs", type=_positive_int, default=3, metavar="N",
                        help="pairs of 1- and 2-worker saturation phases, taking turns, whose median ratio is the "
                             "speedup (the first pair is the main pass)")  # fmt: skip
    parser.add_argument("--lease", type=_positive_float, default=3.0, metavar="SECONDS",
                        help="the workers' lease (renewed while a round runs; a killed worker's expires)")  # fmt: skip
