"""The robot side: the runtime (answers, UTS, durable uplink, updates), its backends (torch, ONNX Runtime), the
adapter slot (verify, apply, hot-swap, rollback, persist) and frame sources (bag, folder, RealSense).

The names below load on first use (PEP 562 module ``__getattr__``), so importing one torch-free module of this
package (``cdcca.edge.onnx_backend``, ``cdcca.edge.runtime``) does not import the torch slot (issue 19).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AdapterSlot": "cdcca.edge.adapter_slot",
    "SlotCounters": "cdcca.edge.adapter_state",
    "BackendAnswer": "cdcca.edge.backend",
    "EdgeBackend": "cdcca.edge.backend",
    "TorchBackend": "cdcca.edge.backend",
    "EdgeConfig": "cdcca.edge.runtime",
    "EdgeRuntime": "cdcca.edge.runtime",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
