"""The robot side: the runtime (answers, UTS, durable uplink, updates), its backends (torch, ONNX Runtime), the
adapter slot (verify, apply, hot-swap, rollback, persist) and frame sources (bag, folder, RealSense)."""

from cdcca.edge.adapter_slot import AdapterSlot, SlotCounters
from cdcca.edge.backend import BackendAnswer, EdgeBackend, TorchBackend
from cdcca.edge.runtime import EdgeConfig, EdgeRuntime

__all__ = ["AdapterSlot", "BackendAnswer", "EdgeBackend", "EdgeConfig", "EdgeRuntime", "SlotCounters", "TorchBackend"]
