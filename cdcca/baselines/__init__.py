"""Test-time adaptation baselines the paper compares against (one per file), behind one interface."""

from cdcca.baselines.base import AdaptationMethod, RoundResult

__all__ = ["AdaptationMethod", "RoundResult"]
