"""Two independent CDR implementations agree: rclpy's (rosidl typesupport, Fast CDR) and cdcca.wire's (rosbags,
from the .msg files). For every cdcca_msgs type and the ROS types the robot reads, each side's bytes are the
other's, and each decodes what the other wrote.

"The same bytes" means: the same length and the same value at every position but alignment padding. The CDR
standard leaves padding unspecified; cdcca.wire writes zeros there, Fast CDR leaves whatever was in its buffer
(seen here: 0x3e, 0xe9 before a string length). So every differing byte must look like padding: zero in ours up
to the next 4-byte boundary of the payload. Values are checked by decoding each side's bytes with the other."""

import numpy as np
import pytest
from cdcca_msgs.msg import AdapterStatus, Answer, UtsAck, UtsTokens, WeightDelta
from cdcca_msgs.srv import Ask
from rclpy.serialization import deserialize_message, serialize_message
from rosbags.typesys.base import Nodetype
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from cdcca import wire

HEADER = {"stamp": {"sec": 1_700_000_123, "nanosec": 456_789_012}, "frame_id": "camera_color_optical_frame"}
IMAGE = {"header": HEADER, "height": 2, "width": 3, "encoding": "rgb8", "is_bigendian": 0, "step": 9,
         "data": list(range(18))}  # fmt: skip
CASES = [
    (wire.UTS_TOKENS, UtsTokens, {
        "header": HEADER, "robot_id": "r1", "sample_id": "r1-17-3", "adapter_version": 3, "prompt": "what digit? ✓",
        "student_answer": "seven", "sample_entropy": 1.25, "num_tokens": 17, "token_dim": 8,
        "token_indices": [0, 3, 16], "token_variance": [0.5, 0.25, 1e-7], "encoding": UtsTokens.ENCODING_INT8,
        "scales": [0.1, 0.2, 0.3], "token_data": [(i * 37) % 256 for i in range(24)],
        "more_sample_ids": ["r1-17-4", "r1-17-5"], "more_prompts": ["which colour?", "describe it ✓"],
        "more_student_answers": ["red", ""], "more_sample_entropies": [0.125, 3.5]}),  # one frame, three prompts
    (wire.UTS_ACK, UtsAck, {"header": HEADER, "robot_id": "r1", "sample_ids": ["r1-1", "", "r1-ü"],
                            "sequence": 2**63 - 1, "key_id": "cloud-1", "signature": [7] * 64}),
    (wire.WEIGHT_DELTA, WeightDelta, {
        "header": HEADER, "robot_id": "r1", "version": 7, "base_version": 6, "keyframe": True, "codec": "nf4-zstd",
        "num_params": 2**40 + 3, "sha256": list(range(32)), "key_id": "cloud-1", "signature": [255] * 64,
        "payload": [(i * 11) % 256 for i in range(301)]}),
    (wire.ADAPTER_STATUS, AdapterStatus, {"header": HEADER, "robot_id": "r1", "version": 2,
                                          "state": AdapterStatus.STATE_ROLLED_BACK, "reason": "NaN in the output"}),
    (wire.ANSWER, Answer, {"header": HEADER, "sample_id": "r1-5", "prompt": "colour?", "answer": "red",
                           "entropy": 0.75, "adapter_version": 1, "latency_ms": 12.5}),
    (wire.ASK_REQUEST, Ask.Request, {"prompt": "what digit?", "image": IMAGE}),
    (wire.ASK_RESPONSE, Ask.Response, {"answer": "three", "entropy": 0.5, "adapter_version": 4}),
    (wire.IMAGE, Image, IMAGE),
    (wire.COMPRESSED_IMAGE, CompressedImage, {"header": HEADER, "format": "png", "data": [137, 80, 78, 71, 0, 1]}),
    (wire.STRING, String, {"data": "a prompt with ünïcödé"}),
]  # fmt: skip
_NUMPY = {"uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "float32": np.float32, "int8": np.int8,
          "float64": np.float64, "octet": np.uint8, "byte": np.uint8, "char": np.uint8}  # fmt: skip


def same_but_padding(ours: bytes, theirs: bytes) -> bool:
    """Equal, or different only in alignment padding (see the module doc)."""
    if len(ours) != len(theirs) or ours[:4] != theirs[:4]:
        return False
    for i in range(4, len(ours)):
        if ours[i] != theirs[i]:
            boundary = i + 1 + (-(i + 1 - 4)) % 4  # the next 4-byte boundary of the payload (after the header)
            if any(ours[i:boundary]):  # padding runs up to an aligned field, and we write it as zeros
                return False
    return True


def test_padding_is_the_only_difference_allowed():
    assert same_but_padding(b"\x00\x01\x00\x00ab\x00\x00", b"\x00\x01\x00\x00ab>\xe9")
    assert not same_but_padding(b"\x00\x01\x00\x00abc\x00", b"\x00\x01\x00\x00abd\x00")  # a value differs
    assert not same_but_padding(b"\x00\x01\x00\x00a\x00\x00\x07", b"\x00\x01\x00\x00a>\x00\x00")  # not padding
    assert not same_but_padding(b"\x00\x01\x00\x00ab", b"\x00\x01\x00\x00ab\x00\x00")  # a length differs


def wire_message(type_name: str, values: dict):
    """The cdcca.wire message of ``values`` (built from the rosbags field definitions)."""
    _, fields = wire.TYPESTORE.fielddefs[wire.canonical(type_name)]
    kwargs = {}
    for name, (kind, detail) in fields:
        if name not in values:
            continue
        value = values[name]
        if kind == Nodetype.NAME:
            kwargs[name] = wire_message(detail, value)
        elif kind in (Nodetype.ARRAY, Nodetype.SEQUENCE) and detail[0][1][0] in _NUMPY:
            kwargs[name] = np.array(value, dtype=_NUMPY[detail[0][1][0]])
        else:
            kwargs[name] = value
    return wire.new(type_name, **kwargs)


def ros_message(ros_type, values: dict):
    """The rclpy message of ``values`` (built by rosidl's generated classes)."""
    msg = ros_type()
    for name, value in values.items():
        if isinstance(value, dict):
            value = ros_message(type(getattr(msg, name)), value)
        setattr(msg, name, value)
    return msg


@pytest.mark.parametrize("type_name, ros_type, values", CASES, ids=[c[0].rsplit("/", 1)[-1] for c in CASES])
def test_rclpy_and_cdcca_wire_write_the_same_bytes_and_read_each_other(type_name, ros_type, values):
    ours, theirs = wire_message(type_name, values), ros_message(ros_type, values)
    ours_bytes, their_bytes = wire.encode(ours), serialize_message(theirs)
    assert same_but_padding(ours_bytes, their_bytes)
    assert deserialize_message(ours_bytes, ros_type) == theirs
    assert wire.encode(wire.decode(type_name, their_bytes)) == ours_bytes
    empty_ours, empty_theirs = wire.encode(wire.new(type_name)), serialize_message(ros_type())
    assert same_but_padding(empty_ours, empty_theirs)  # defaults too


def test_every_cdcca_msgs_interface_is_covered():
    assert {c[0] for c in CASES} == set(wire.SUPPORTED_TYPES)
    names = ("STATE_APPLIED", "STATE_REJECTED", "STATE_ROLLED_BACK")
    constants = {name: getattr(AdapterStatus, name) for name in names}
    assert constants == {"STATE_APPLIED": wire.APPLIED, "STATE_REJECTED": wire.REJECTED,
                         "STATE_ROLLED_BACK": wire.ROLLED_BACK}  # fmt: skip
