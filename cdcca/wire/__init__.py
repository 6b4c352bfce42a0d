"""The wire format: ROS 2 CDR bytes of the ``cdcca_msgs`` interfaces, produced without ROS.

At import, the ``.msg``/``.srv`` files of ``ros2_ws/src/cdcca_msgs`` -- the single source of truth -- are
registered with a ``rosbags`` typestore (ROS 2 Jazzy store plus ours). Every link and every bag carries the
bytes :func:`encode` returns, which are the bytes a ROS 2 node publishing the same message would produce
(XCDR1 with the 4-byte encapsulation header). Decoding anything malformed raises :class:`WireError` and
nothing else, so a runtime can count and reject bad input and keep serving.

Type names are the ROS 2 ones: ``cdcca_msgs/msg/UtsTokens``; ``cdcca_msgs/UtsTokens`` is accepted too.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
from rosbags.typesys import Stores, get_types_from_msg, get_typestore
from rosbags.typesys.base import Nodetype

from cdcca.errors import CdccaError

OUR_MESSAGES = ("UtsTokens", "UtsAck", "WeightDelta", "AdapterStatus", "Answer")
OUR_SERVICES = ("Ask",)
UTS_TOKENS = "cdcca_msgs/msg/UtsTokens"
UTS_ACK = "cdcca_msgs/msg/UtsAck"
WEIGHT_DELTA = "cdcca_msgs/msg/WeightDelta"
ADAPTER_STATUS = "cdcca_msgs/msg/AdapterStatus"
ANSWER = "cdcca_msgs/msg/Answer"
ASK_REQUEST = "cdcca_msgs/srv/Ask_Request"
ASK_RESPONSE = "cdcca_msgs/srv/Ask_Response"
IMAGE = "sensor_msgs/msg/Image"
COMPRESSED_IMAGE = "sensor_msgs/msg/CompressedImage"
STRING = "std_msgs/msg/String"
DIAGNOSTIC_ARRAY = "diagnostic_msgs/msg/DiagnosticArray"  # what diagnostic_updater publishes on /diagnostics
# the cdcca_msgs interfaces and the ROS types they carry
SUPPORTED_TYPES = (UTS_TOKENS, UTS_ACK, WEIGHT_DELTA, ADAPTER_STATUS, ANSWER, ASK_REQUEST, ASK_RESPONSE, IMAGE,
                   COMPRESSED_IMAGE, STRING)  # fmt: skip
LINK_ONLY_TYPES = (DIAGNOSTIC_ARRAY,)  # ROS types the link carries besides: the status robots and cloud publish

_NUMPY = {
    "bool": np.bool_, "byte": np.uint8, "char": np.uint8, "octet": np.uint8,
    "int8": np.int8, "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16, "int32": np.int32,
    "uint32": np.uint32, "int64": np.int64, "uint64": np.uint64, "float32": np.float32, "float64": np.float64,
}  # fmt: skip


class WireError(CdccaError, ValueError):
    """Bytes that are not a valid CDR message of the expected type, or a message that cannot be encoded."""


def msgs_dir() -> Path:
    """Folder of the ``cdcca_msgs`` interfaces: ``$CDCCA_MSGS_DIR``, this checkout, the copy an installed package
    carries (``cdcca/wire/interfaces``, links to the checkout's ``msg/`` and ``srv/``), or an installed ROS share
    dir."""
    candidates = []
    if os.environ.get("CDCCA_MSGS_DIR"):
        candidates.append(Path(os.environ["CDCCA_MSGS_DIR"]))
    candidates.append(Path(__file__).resolve().parents[2] / "ros2_ws" / "src" / "cdcca_msgs")
    candidates.append(Path(__file__).parent / "interfaces")  # an installed package: its copy of msg/ and srv/
    for prefix in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep):
        if prefix:
            candidates.append(Path(prefix) / "share" / "cdcca_msgs")
    for candidate in candidates:
        if (candidate / "msg" / "UtsTokens.msg").is_file():
            return candidate
    raise WireError(
        "cannot find the cdcca_msgs interface files; run from a CD-CCA checkout, source a ROS 2 workspace that "
        "built cdcca_msgs, or set CDCCA_MSGS_DIR to the package folder"
    )


def _build_typestore():
    store = get_typestore(Stores.ROS2_JAZZY)
    root = msgs_dir()
    types = {}
    for name in OUR_MESSAGES:
        types.update(get_types_from_msg((root / "msg" / f"{name}.msg").read_text(), f"cdcca_msgs/msg/{name}"))
    for name in OUR_SERVICES:
        request, response = (root / "srv" / f"{name}.srv").read_text().split("\n---\n")
        types.update(get_types_from_msg(request, f"cdcca_msgs/srv/{name}_Request"))
        types.update(get_types_from_msg(response, f"cdcca_msgs/srv/{name}_Response"))
    store.register(types)
    return store


TYPESTORE = _build_typestore()


def canonical(type_name: str) -> str:
    """The typestore's name: ``pkg/Name`` -> ``pkg/msg/Name``; service parts ``pkg/srv/Name_Request`` are kept
    by rosbags as ``pkg/srv/msg/Name_Request`` (it has no service types; the CDR is that of the struct).
    Unknown types raise :class:`WireError`."""
    parts = type_name.split("/")
    if len(parts) == 2:
        full = f"{parts[0]}/msg/{parts[1]}"
    elif len(parts) == 3 and parts[1] == "srv":
        full = f"{parts[0]}/srv/msg/{parts[2]}"
    else:
        full = type_name
    if full not in TYPESTORE.types:
        raise WireError(f"unknown message type {type_name!r}; supported: {', '.join(SUPPORTED_TYPES)}")
    return full


def message_class(type_name: str) -> type:
    """The dataclass of a message type (fields as in the ``.msg`` file, constants as class attributes)."""
    return TYPESTORE.types[canonical(type_name)]


def _default(node: tuple) -> Any:
    kind, detail = node
    if kind == Nodetype.NAME:
        return new(detail)
    if kind == Nodetype.BASE:
        base = detail[0]
        return "" if base in ("string", "wstring") else (False if base == "bool" else _NUMPY[base](0).item())
    element, size = detail
    if element[0] == Nodetype.BASE and element[1][0] in _NUMPY:
        return np.zeros(size if kind == Nodetype.ARRAY else 0, dtype=_NUMPY[element[1][0]])
    return [_default(element) for _ in range(size)] if kind == Nodetype.ARRAY else []


def new(type_name: str, **fields: Any) -> Any:
    """A message of ``type_name`` with ``fields`` set and every other field at its zero value."""
    full = canonical(type_name)
    _, field_defs = TYPESTORE.fielddefs[full]
    known = {name for name, _ in field_defs}
    unknown = set(fields) - known
    if unknown:
        raise WireError(f"{full} has no field(s) {sorted(unknown)}; its fields are {sorted(known)}")
    values = {name: fields[name] if name in fields else _default(node) for name, node in field_defs}
    return TYPESTORE.types[full](**values)


def header(stamp_ns: int = 0, frame_id: str = "") -> Any:
    """A ``std_msgs/Header`` with the stamp given in nanoseconds since the epoch."""
    time = TYPESTORE.types["builtin_interfaces/msg/Time"](sec=int(stamp_ns // 10**9), nanosec=int(stamp_ns % 10**9))
    return TYPESTORE.types["std_msgs/msg/Header"](stamp=time, frame_id=frame_id)


def stamp_ns(msg_header: Any) -> int:
    """Nanoseconds since the epoch of a ``std_msgs/Header``."""
    return msg_header.stamp.sec * 10**9 + msg_header.stamp.nanosec


def encode(msg: Any) -> bytes:
    """CDR bytes (little-endian, with encapsulation header) of a message built by :func:`new` or decoded."""
    type_name = getattr(msg, "__msgtype__", None)
    if type_name is None:
        raise WireError(f"{type(msg).__name__} is not a registered message; build it with cdcca.wire.new()")
    try:
        return bytes(TYPESTORE.serialize_cdr(msg, type_name))
    except Exception as err:  # rosbags raises assorted errors for wrong field types or sizes
        raise WireError(f"cannot encode {type_name}: {err}") from err


def decode(type_name: str, data: bytes | bytearray | memoryview) -> Any:
    """Parse CDR bytes as ``type_name``. Any malformed, truncated or foreign input raises :class:`WireError`."""
    full = canonical(type_name)
    if len(data) < 4 or data[0] != 0 or data[1] not in (0, 1):
        raise WireError(f"not a CDR message: bad encapsulation header {bytes(data[:4])!r} for {full}")
    try:
        return TYPESTORE.deserialize_cdr(bytes(data), full)
    except Exception as err:  # SerdeError, struct.error, IndexError, UnicodeDecodeError, ... -> one type
        earlier = _decode_before_appended(full, bytes(data))
        if earlier is not None:
            return earlier
        raise WireError(f"malformed {full}: {type(err).__name__}: {err}") from err


# Fields appended at the end of a message after it first shipped. CDR written before (e.g. held in a robot's durable
# uplink queue across an upgrade) decodes with its earlier definition, the appended fields at their zero value.
APPENDED_FIELDS = {UTS_TOKENS: ("more_sample_ids", "more_prompts", "more_student_answers", "more_sample_entropies")}


@functools.cache
def _earlier_typestore():
    """The appended-to messages as first defined: built on the first message that needs it (a cold path)."""
    store = get_typestore(Stores.ROS2_JAZZY)
    types = {}
    for full, fields in APPENDED_FIELDS.items():
        text = (msgs_dir() / "msg" / f"{full.rsplit('/', 1)[1]}.msg").read_text()
        kept = [line for line in text.splitlines() if (line.split() + ["", ""])[1] not in fields]
        types.update(get_types_from_msg("\n".join(kept), full))
    store.register(types)
    return store


def _decode_before_appended(full: str, data: bytes) -> Any | None:
    """``data`` as the earlier definition of ``full`` (without its appended fields) wrote it, or ``None``."""
    if full not in APPENDED_FIELDS:
        return None
    try:
        store = _earlier_typestore()
        earlier = store.deserialize_cdr(data, full)
        end = len(store.serialize_cdr(earlier, full))  # where the earlier message ends (either byte order)
        if not 0 <= len(data) - end <= 3 or any(data[end:]):  # more than its padding: a newer message cut short
            return None
    except Exception:
        return None
    return _ours(earlier)


def _ours(value: Any) -> Any:
    """A message of the earlier typestore (nested ones and lists of them included) as this one's; the fields only
    this one has get their zero value."""
    if isinstance(value, list):
        return [_ours(v) for v in value]
    type_name = getattr(value, "__msgtype__", None)
    if type_name is None:
        return value
    names = [name for name, _ in _earlier_typestore().fielddefs[type_name][1]]
    return new(type_name, **{name: _ours(getattr(value, name)) for name in names})


def msgdef(type_name: str) -> tuple[str, str]:
    """(message definition text, hash) as rosbag2 stores them for a connection of ``type_name``."""
    return TYPESTORE.generate_msgdef(canonical(type_name), ros_version=2)


_STATUS = TYPESTORE.types[ADAPTER_STATUS]
APPLIED, REJECTED, ROLLED_BACK = _STATUS.STATE_APPLIED, _STATUS.STATE_REJECTED, _STATUS.STATE_ROLLED_BACK
"""``AdapterStatus.state`` values, read from ``AdapterStatus.msg``."""
