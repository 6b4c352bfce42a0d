"""Adaptation baselines the paper compares against (one per file), behind one interface."""

from cdcca.baselines.base import AdaptationMethod, RoundResult
from cdcca.baselines.cotta import CoTTA, CoTTAConfig
from cdcca.baselines.cwd import CWD, CWDConfig
from cdcca.baselines.pkd import PKD, PKDConfig
from cdcca.baselines.tent import Tent, TentConfig

__all__ = [
    "AdaptationMethod", "RoundResult", "Tent", "TentConfig", "CoTTA", "CoTTAConfig", "PKD", "PKDConfig", "CWD",
    "CWDConfig",
]  # fmt: skip
