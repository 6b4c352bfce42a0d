"""The wire format: round trips, an independent CDR decoder agrees, and malformed bytes raise WireError only."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mcap_ros2._dynamic import generate_dynamic

from cdcca import wire
from cdcca.wire import WireError


def _uts():
    return wire.new(
        wire.UTS_TOKENS, header=wire.header(1_700_000_000_123_456_789, "camera_color_optical_frame"), robot_id="r1",
        sample_id="r1-000042", adapter_version=3, prompt="what digit is this?", student_answer="seven",
        sample_entropy=1.25, num_tokens=37, token_dim=4, token_indices=np.array([0, 5, 36], np.uint16),
        token_variance=np.array([0.5, 0.25, 0.125], np.float32), encoding=0,
        scales=np.array([0.01, 0.02, 0.03], np.float32), token_data=np.arange(12, dtype=np.uint8),
    )  # fmt: skip


def _samples():
    return {
        wire.UTS_TOKENS: _uts(),
        wire.UTS_ACK: wire.new(wire.UTS_ACK, robot_id="r1", sample_ids=["r1-1", "r1-7"]),
        wire.WEIGHT_DELTA: wire.new(
            wire.WEIGHT_DELTA,
            robot_id="r1",
            version=4,
            base_version=3,
            keyframe=True,
            codec="nf4",
            num_params=1234,
            base_fingerprint="0123456789abcdef",
            sha256=np.arange(32, dtype=np.uint8),
            key_id="cloud-1",
            signature=np.full(64, 7, np.uint8),
            payload=np.frombuffer(b"safetensors-bytes", np.uint8),
        ),  # fmt: skip
        wire.ADAPTER_STATUS: wire.new(wire.ADAPTER_STATUS, robot_id="r1", version=4, state=1, reason="bad signature"),
        wire.ANSWER: wire.new(
            wire.ANSWER, sample_id="r1-1", prompt="q", answer="seven", entropy=0.5, adapter_version=2, latency_ms=12.5
        ),  # fmt: skip
        wire.ASK_REQUEST: wire.new(wire.ASK_REQUEST, prompt="what digit is this?"),
        wire.ASK_RESPONSE: wire.new(wire.ASK_RESPONSE, answer="two", entropy=0.25, adapter_version=1),
        wire.IMAGE: wire.new(
            wire.IMAGE, height=2, width=3, encoding="rgb8", step=9, data=np.arange(18, dtype=np.uint8)
        ),
        wire.COMPRESSED_IMAGE: wire.new(wire.COMPRESSED_IMAGE, format="jpeg", data=np.arange(5, dtype=np.uint8)),
        wire.STRING: wire.new(wire.STRING, data="which number can be seen in the picture?"),
        wire.DIAGNOSTIC_ARRAY: _diagnostics(),
    }


def _diagnostics():
    from cdcca.edge.diagnostics import DiagnosticReport, diagnostic_array

    report = DiagnosticReport(1, "uplink queue nearly full", {"adapter_version": "3", "cloud": "down"})
    return diagnostic_array(report, "r1", stamp_ns=1_700_000_000_123_456_789)


def _equal(a, b) -> bool:
    if hasattr(a, "__dataclass_fields__"):
        return all(
            _equal(getattr(a, f), getattr(b, f))
            for f in a.__dataclass_fields__
            if not f.isupper() and not f.startswith("__")
        )
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    return a == b


@pytest.mark.parametrize("type_name", wire.SUPPORTED_TYPES + wire.LINK_ONLY_TYPES)
def test_round_trip(type_name):
    msg = _samples()[type_name]
    data = wire.encode(msg)
    assert data[:4] == b"\x00\x01\x00\x00"  # CDR little-endian encapsulation, as ROS 2 writes it
    assert _equal(wire.decode(type_name, data), msg)


@pytest.mark.parametrize(
    "type_name", [wire.UTS_TOKENS, wire.UTS_ACK, wire.WEIGHT_DELTA, wire.ADAPTER_STATUS, wire.ANSWER, wire.IMAGE]
)
def test_independent_decoder_reads_our_bytes(type_name):
    # mcap-ros2-support is a second, independent implementation of ROS 2 CDR
    msg = _samples()[type_name]
    text, _ = wire.msgdef(type_name)
    decoded = generate_dynamic(type_name, text)[type_name](wire.encode(msg))
    for field in msg.__dataclass_fields__:
        if field.isupper() or field.startswith("__") or field == "header":
            continue
        ours, theirs = getattr(msg, field), getattr(decoded, field)
        if isinstance(ours, np.ndarray):
            assert np.allclose(np.asarray(list(theirs) if not isinstance(theirs, bytes) else list(theirs)), ours), field
        elif isinstance(ours, float):
            assert theirs == pytest.approx(ours), field
        else:
            assert theirs == ours, field


def test_header_stamp_survives_the_independent_decoder():
    text, _ = wire.msgdef(wire.UTS_TOKENS)
    decoded = generate_dynamic(wire.UTS_TOKENS, text)[wire.UTS_TOKENS](wire.encode(_uts()))
    assert (decoded.header.stamp.sec, decoded.header.stamp.nanosec) == (1_700_000_000, 123_456_789)
    assert decoded.header.frame_id == "camera_color_optical_frame"
    assert wire.stamp_ns(_uts().header) == 1_700_000_000_123_456_789


def test_constants_come_from_the_msg_files():
    assert wire.message_class(wire.UTS_TOKENS).ENCODING_FP16 == 1
    assert wire.message_class("cdcca_msgs/AdapterStatus").STATE_ROLLED_BACK == 2


@pytest.mark.parametrize(
    ("data", "message"),
    [(b"", "encapsulation header"), (b"\x07\x01\x00\x00abcd", "encapsulation header"),
     (b"\x00\x01\x00\x00\xff\xff\xff\x7f", "malformed")],
)  # fmt: skip
def test_malformed_bytes_raise_wire_error(data, message):
    with pytest.raises(WireError, match=message):
        wire.decode(wire.UTS_TOKENS, data)


def test_truncated_message_raises_wire_error():
    data = wire.encode(_uts())
    for cut in range(4, len(data) - 1, 7):
        with pytest.raises(WireError):
            wire.decode(wire.UTS_TOKENS, data[:cut])


def test_unknown_type_and_fields_are_explained():
    with pytest.raises(WireError, match="unknown message type"):
        wire.new("cdcca_msgs/msg/Nope")
    with pytest.raises(WireError, match="no field"):
        wire.new(wire.ANSWER, colour="red")
    with pytest.raises(WireError, match="not a registered message"):
        wire.encode(object())
    with pytest.raises(WireError, match="cannot encode"):
        wire.encode(wire.new(wire.WEIGHT_DELTA, sha256=np.zeros(5, np.uint8)))  # uint8[32] must hold 32


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes_only_ever_raise_wire_error(data):
    for type_name in (wire.UTS_TOKENS, wire.WEIGHT_DELTA, wire.IMAGE):
        try:
            wire.decode(type_name, b"\x00\x01\x00\x00" + data)
        except WireError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_mutated_messages_only_ever_raise_wire_error(data):
    original = bytearray(wire.encode(_uts()))
    for _ in range(data.draw(st.integers(1, 6))):
        position = data.draw(st.integers(0, len(original) - 1))
        original[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(original)))
    try:
        decoded = wire.decode(wire.UTS_TOKENS, bytes(original[:cut]))
    except WireError:
        return
    assert decoded.__msgtype__ == wire.UTS_TOKENS


def _earlier_uts_tokens():
    """``UtsTokens`` as it was defined before the ``more_*`` fields were appended, in a typestore of its own."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    text = (wire.msgs_dir() / "msg" / "UtsTokens.msg").read_text()
    lines = text.splitlines()
    earlier = [line for line in lines if not line.split(" ")[1:2] or not line.split(" ")[1].startswith("more_")]
    assert len(earlier) == len(lines) - 4
    earlier = "\n".join(earlier)
    store = get_typestore(Stores.ROS2_JAZZY)
    store.register(get_types_from_msg(earlier, wire.UTS_TOKENS))
    return store


def test_uts_tokens_written_before_the_frame_fields_still_decode_and_cut_ones_do_not():
    from cdcca.uts import FramePrompt, frame_prompts, pack_tokens

    store = _earlier_uts_tokens()
    for kept in range(1, 6):  # every alignment of where the earlier message ends
        msg = pack_tokens(np.arange(15.0).reshape(5, 3), np.arange(5) < kept, np.ones(5), robot_id="r",
                          sample_id=f"s{kept}", adapter_version=2, prompt="p" * kept, student_answer="a",
                          sample_entropy=1.5)  # fmt: skip
        cls = store.types[wire.UTS_TOKENS]
        fields = {name: getattr(msg, name) for name, _ in store.fielddefs[wire.UTS_TOKENS][1]}
        fields["header"] = store.types["std_msgs/msg/Header"](
            stamp=store.types["builtin_interfaces/msg/Time"](sec=1, nanosec=2), frame_id="cam")
        data = bytes(store.serialize_cdr(cls(**fields), wire.UTS_TOKENS))
        decoded = wire.decode(wire.UTS_TOKENS, data)  # e.g. held in a robot's uplink queue across the upgrade
        assert frame_prompts(decoded) == [FramePrompt(f"s{kept}", "p" * kept, "a", 1.5)]
        assert decoded.header.frame_id == "cam" and wire.stamp_ns(decoded.header) == 10**9 + 2
        assert np.array_equal(decoded.token_data, msg.token_data) and len(decoded.more_prompts) == 0
        padded = data + bytes(-(len(data) - 4) % 4)  # as Cyclone sends it: padded to 4 bytes
        assert frame_prompts(wire.decode(wire.UTS_TOKENS, padded)) == frame_prompts(decoded)
        with pytest.raises(wire.WireError):
            wire.decode(wire.UTS_TOKENS, data[:-1])  # an earlier message cut short is still malformed
    framed = wire.encode(pack_tokens(np.ones((5, 3)), np.ones(5), np.ones(5), robot_id="r", sample_id="s",
                                     adapter_version=0, prompt="p", student_answer="a", sample_entropy=1.0,
                                     more=[FramePrompt("t", "q", "b", 2.0)]))  # fmt: skip
    for cut in range(len(framed) - 20, len(framed)):  # a message with frame prompts, cut inside them
        with pytest.raises(wire.WireError):
            wire.decode(wire.UTS_TOKENS, framed[:cut])
