"""cdcca.edge.ros_glue: what the cdcca_edge node delegates to, tested without ROS (a fake runtime, a fake clock)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest

from cdcca import wire
from cdcca.bag import compressed_to_msg, image_to_msg
from cdcca.edge import ros_glue
from cdcca.edge.runtime import EdgeConfig, EdgeCounters, EdgeRuntime
from cdcca.edge.uplink import UplinkQueue

FRAME = (np.arange(6 * 5 * 3) % 251).astype(np.uint8).reshape(6, 5, 3)  # (H, W, 3)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class FakeRuntime:
    """The EdgeRuntime surface the glue uses; answers "seen <mean pixel>" so the frame used is visible. The
    uplink and heartbeat are the real runtime's."""

    pump = EdgeRuntime.pump
    heartbeat = EdgeRuntime.heartbeat

    def __init__(self, robot_id="r1", capacity=4):
        self.config = EdgeConfig(robot_id=robot_id, resend_after_s=5.0, pump_every_s=0.1, heartbeat_every_s=1.0)
        self.link = None
        self.backend = SimpleNamespace(version=3)
        self.uplink = UplinkQueue(":memory:", capacity)
        self.asked, self.applied = [], []
        self.failed = 0
        self.counters = EdgeCounters()

    def ask(self, images, prompts, sample_ids=None, stamp_ns=None):
        self.asked.append((images, list(prompts), list(sample_ids)))
        return [wire.new(wire.ANSWER, header=wire.header(stamp_ns), sample_id=sid, prompt=p,
                         answer=f"seen {float(np.mean(img)):.1f}", entropy=0.5, adapter_version=3, latency_ms=20.0)
                for img, p, sid in zip(images, prompts, sample_ids)]  # fmt: skip

    def apply(self, msg):
        self.applied.append(msg)
        ok = msg.key_id == "cloud-1"
        return wire.new(wire.ADAPTER_STATUS, robot_id="r1", version=msg.version if ok else 3, state=0 if ok else 1,
                        reason="" if ok else "unknown key")  # fmt: skip

    def stats(self):
        uplink = vars(self.uplink.stats())
        return {"answers": sum(len(p) for _, p, _ in self.asked), "failed_answers": self.failed,
                "adapter_version": self.backend.version, **{f"uplink_{k}": v for k, v in uplink.items()}}  # fmt: skip


@pytest.fixture()
def glue():
    clock, sent = Clock(), []
    glue = ros_glue.EdgeGlue(FakeRuntime(), lambda topic, data: sent.append((topic, data)), batch_size=2,
                             max_frame_age_s=1.0, clock=clock)  # fmt: skip
    glue.sent, glue.clock = sent, clock
    return glue


# ---------------------------------------------------------------------------------------------- parameters


def test_defaults_validate_and_every_parameter_is_described():
    values = ros_glue.default_parameters()
    assert ros_glue.validate_parameters({}) == values
    assert values["camera_topic"] == "/camera/camera/color/image_raw" and values["robot_id"] == "r1"
    assert all(len(spec.description) > 20 for spec in ros_glue.PARAMETERS)
    doubles = [spec.name for spec in ros_glue.PARAMETERS if spec.kind == "double"]
    given = ros_glue.validate_parameters({name: 1 for name in doubles})  # ints are fine for doubles...
    assert all(type(given[name]) is float and given[name] == 1.0 for name in doubles)  # ...and come back as floats


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("robot_id", "r/1", "robot_id must be non-empty letters"),
        ("robot_id", "", "robot_id must be non-empty letters"),
        ("backend", "gpu", "backend must be one of torch, onnx"),
        ("batch_size", 0, "batch_size must be >= 1"),
        ("batch_size", True, "batch_size must be a integer"),
        ("batch_size", 2.5, "batch_size must be a integer"),
        ("camera_topic", "/camera/color image", "camera_topic must be a ROS topic name"),
        ("uts_sample_fraction", 0.0, "uts_sample_fraction must be > 0.0"),
        ("uts_encoding", "int4", "uts_encoding must be one of int8, fp16"),
        ("prompts", [], "prompts must be a non-empty list"),
        ("prompts", ["ok", " "], "prompts must be a non-empty list"),
        ("resend_after_s", 0.0, "resend_after_s must be > 0.0"),
        ("subscribe_compressed", "yes", "subscribe_compressed must be a bool"),
        ("no_such_parameter", 1, "unknown parameter 'no_such_parameter'"),
    ],
)  # fmt: skip
def test_invalid_parameters_are_refused_with_the_reason(name, value, message):
    assert message in ros_glue.check_parameter(name, value)
    with pytest.raises(ros_glue.ParameterError, match=message.split(" ")[0]):
        ros_glue.validate_parameters({name: value})


def test_parameter_file_and_runtime_settings(tmp_path, monkeypatch):
    path = tmp_path / "p.yaml"
    path.write_text("/**:\n  ros__parameters:\n    robot_id: r7\n    queue_capacity: 9\n    uts_encoding: fp16\n")
    params = ros_glue.validate_parameters(ros_glue.read_parameter_file(path))
    monkeypatch.setenv("CDCCA_CACHE", str(tmp_path / "cache"))
    config = ros_glue.edge_config(params)
    assert (config.robot_id, config.queue_capacity, config.uts.encoding) == ("r7", 9, "fp16")
    assert config.state_dir == tmp_path / "cache" / "edge" / "r7"
    paths = ros_glue.resolve_paths({**params, "checkpoints": str(tmp_path / "ck")})
    assert paths.checkpoints == tmp_path / "ck" and paths.trust_dir == tmp_path / "cache" / "trust"
    (tmp_path / "other.yaml").write_text("/other_node:\n  ros__parameters: {a: 1}\n")
    with pytest.raises(ros_glue.ParameterError, match="no '/cdcca_edge: ros__parameters:'"):
        ros_glue.read_parameter_file(tmp_path / "other.yaml")


# --------------------------------------------------------------------------------------------------- frames


def test_latest_frame_converts_lazily_and_ages():
    clock = Clock()
    frame = ros_glue.LatestFrame(clock)
    with pytest.raises(ros_glue.NoFrameError, match="no camera frame"):
        frame.get()
    frame.update(image_to_msg(FRAME, 1_500, "cam", encoding="bgr8"))
    rgb, stamp, frame_id = frame.get(max_age_s=1.0)
    assert np.array_equal(rgb, FRAME) and (stamp, frame_id) == (1_500, "cam")
    assert frame.get()[0] is rgb  # converted once
    clock.now += 2.0
    assert frame.age_s() == pytest.approx(2.0)
    with pytest.raises(ros_glue.NoFrameError, match="2.0 s old"):
        frame.get(max_age_s=1.0)
    frame.update(compressed_to_msg(FRAME, "png", stamp_ns=7))
    assert np.array_equal(frame.get()[0], FRAME)
    bad = image_to_msg(FRAME)
    bad.encoding = "16UC1"
    frame.update(bad)
    with pytest.raises(ros_glue.NoFrameError, match="unsupported image encoding"):
        frame.get()
    assert frame.bad == 1 and frame.received == 3


# ----------------------------------------------------------------------------------------------------- glue


def test_prompts_wait_for_a_first_frame_then_are_answered_in_batches(glue):
    for text in ("a?", "b?", "c?"):
        glue.on_prompt(wire.encode(wire.new(wire.STRING, data=text)))  # CDR bytes, as rclpy raw=True gives them
    assert glue.answer_pending() == [] and glue.pending() == 3
    assert glue.diagnostics().level == ros_glue.ERROR
    glue.on_camera(wire.encode(image_to_msg(FRAME, 42, "camera_color_optical_frame")))
    first, second = glue.answer_pending(), glue.answer_pending()
    assert [a.prompt for a in first + second] == ["a?", "b?", "c?"]
    assert all(a.header.frame_id == "camera_color_optical_frame" and wire.stamp_ns(a.header) == 42 for a in first)
    assert first[0].answer == f"seen {FRAME.mean():.1f}"
    ids = [a.sample_id for a in first + second]
    assert len(set(ids)) == 3 and all(i.startswith("r1-") for i in ids)
    published = [wire.decode(wire.ANSWER, data) for topic, data in glue.sent if topic == "answer"]
    assert [a.sample_id for a in published] == ids and glue.counters.answers_published == 3


def test_stale_frames_drop_prompts_and_malformed_bytes_are_counted(glue):
    glue.on_camera(image_to_msg(FRAME))
    glue.clock.now += 5.0
    glue.on_prompt("what?")
    assert glue.answer_pending() == [] and glue.counters.prompts_dropped == 1 and glue.pending() == 0
    glue.on_camera(b"\x00\x01\x00\x00\xff")
    glue.on_prompt(b"garbage")
    glue.on_weight_delta(b"\x00")
    assert glue.counters.malformed == 3 and glue.counters.frames == 1
    report = glue.diagnostics()
    assert report.level == ros_glue.WARN and "5.0 s old" in report.message


def test_ask_service_uses_the_request_image_or_the_latest_frame(glue):
    with pytest.raises(ros_glue.NoFrameError):
        glue.ask("what digit?")
    glue.on_camera(image_to_msg(FRAME, 9, "cam"))
    assert glue.ask("what digit?").answer == f"seen {FRAME.mean():.1f}"
    other = np.full((4, 4, 3), 200, np.uint8)
    answer = glue.ask("and this?", image_to_msg(other, 77, "request"))
    assert answer.answer == "seen 200.0" and answer.header.frame_id == "request"
    assert glue.ask("empty image", wire.new(wire.IMAGE)).header.frame_id == "cam"  # width 0: latest frame
    with pytest.raises(ValueError, match="empty"):
        glue.ask("  ")


def test_the_loop_uplink_acks_deltas_and_heartbeat(glue):
    runtime = glue.runtime
    for i in range(3):
        runtime.uplink.put(f"r1-{i}", 1.0 + i, f"payload-{i}".encode())
    glue.tick()
    uplinked = [data for topic, data in glue.sent if topic == "uts_tokens"]
    assert sorted(uplinked) == [b"payload-0", b"payload-1", b"payload-2"]
    statuses = [wire.decode(wire.ADAPTER_STATUS, d) for t, d in glue.sent if t == "adapter_status"]
    assert [(s.version, s.reason) for s in statuses] == [(3, "heartbeat")]
    glue.tick()  # neither pump nor heartbeat is due yet
    assert len(glue.sent) == 4
    foreign = wire.new(wire.UTS_ACK, robot_id="r2", sample_ids=["r1-0"])
    assert glue.on_ack(wire.encode(foreign)) == 0 and glue.counters.acks_foreign == 1
    assert glue.on_ack(wire.new(wire.UTS_ACK, robot_id="r1", sample_ids=["r1-0", "r1-1"])) == 2
    assert runtime.uplink.ids() == ["r1-2"]
    forged = wire.new(wire.WEIGHT_DELTA, robot_id="r1", version=4, base_version=3, key_id="mallory")
    assert glue.on_weight_delta(wire.encode(forged)).state == ros_glue.REJECTED
    status = wire.decode(wire.ADAPTER_STATUS, glue.sent[-1][1])
    assert (status.state, status.reason) == (ros_glue.REJECTED, "unknown key")
    report = glue.diagnostics()
    assert report.level == ros_glue.WARN and "rejected" in report.message
    assert report.values["rejected_deltas"] == "1" and report.values["adapter_version"] == "3"
    assert report.values["uplink_queue_depth"] == "1"
    good = wire.new(wire.WEIGHT_DELTA, robot_id="r1", version=4, base_version=3, key_id="cloud-1")
    assert glue.on_weight_delta(good).state == ros_glue.APPLIED and glue.counters.deltas_applied == 1
    assert glue.diagnostics().level == ros_glue.OK  # the rejection was reported once


def test_a_runtime_with_its_own_link_keeps_the_loop_to_itself():
    runtime, sent = FakeRuntime(), []
    runtime.link = object()
    glue = ros_glue.EdgeGlue(runtime, lambda topic, data: sent.append(topic))
    runtime.uplink.put("r1-0", 1.0, b"x")
    glue.tick()
    glue.on_weight_delta(wire.new(wire.WEIGHT_DELTA, robot_id="r1", version=4, key_id="cloud-1"))
    assert sent == [] and not glue.carry_loop and len(runtime.applied) == 1


def test_diagnostics_report_rate_latency_and_a_full_queue(glue):
    glue.on_camera(image_to_msg(FRAME))
    for _ in range(4):
        glue.on_prompt("q?")
    glue.clock.now += 1.0
    glue.answer_pending()
    glue.answer_pending()
    for i in range(4):
        glue.runtime.uplink.put(f"s{i}", 1.0, b"x")
    report = glue.diagnostics()
    assert report.values["answer_rate_hz"] == "4.00" and report.values["latency_ms_mean"] == "20.0"
    assert report.values["uplink_queue_depth"] == "4" and "nearly full" in report.message
    meter = ros_glue.AnswerMeter(window_s=10.0, clock=Clock())
    assert math.isnan(meter.latency_ms()[0])
