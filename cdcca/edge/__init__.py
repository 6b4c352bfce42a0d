"""The robot side: the adapter slot (verify, apply, hot-swap, rollback, persist); the runtime grows here."""

from cdcca.edge.adapter_slot import AdapterSlot, SlotCounters

__all__ = ["AdapterSlot", "SlotCounters"]
