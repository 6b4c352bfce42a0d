"""The options of ``cdcca bench fleet``; imports nothing but argparse, so ``cdcca --help`` stays fast."""

from __future__ import annotations

import argparse


def add_fleet_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the fleet benchmark's own options to its ``bench fleet`` sub-parser."""
    parser.add_argument("--robots", type=int, nargs="+", default=[1, 8, 32, 128], metavar="N",
                        help="fleet sizes to measure")  # fmt: skip
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], metavar="N",
                        help="cloud worker counts to measure")  # fmt: skip
    parser.add_argument("--store", default=None, metavar="URL",
                        help="postgresql:// URL the workers share (default: a SQLite file)")  # fmt: skip
