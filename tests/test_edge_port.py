"""EdgeRuntime behind one port, its parameters and diagnostics: what every shell (Zenoh, rclpy, raw DDS) relies on,
tested without ROS (a fake backend, a fake clock, a port that records)."""

import math
import threading
import time

import numpy as np
import pytest

from cdcca import wire
from cdcca.edge import params
from cdcca.edge.backend import BackendAnswer
from cdcca.edge.diagnostics import ERROR, OK, WARN, AnswerMeter, EdgeDiagnostics
from cdcca.edge.frames import LatestFrame, NoFrameError
from cdcca.edge.runtime import EdgeConfig, EdgeRuntime
from cdcca.envelope import Signer, TrustStore, generate_key, sign_ack, trust_key
from cdcca.uts import UTSConfig
from cdcca.wire.images import compressed_to_msg, image_to_msg, msg_to_rgb
from tests.test_transport import wait_until

FRAME = (np.arange(6 * 5 * 3) % 251).astype(np.uint8).reshape(6, 5, 3)  # (H, W, 3)
NEVER_UPLOAD = UTSConfig(sample_mode="threshold", entropy_threshold=1e9)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class FakeBackend:
    """Answers "seen <mean pixel>" (so the frame used is visible); accepts deltas signed with key ``cloud-1``."""

    name = "fake"

    def __init__(self):
        self.version, self.batches = 3, []

    def answer(self, images, prompts):
        self.batches.append(list(prompts))
        texts = [f"seen {float(np.mean(img)):.1f}" for img in images]
        return BackendAnswer(texts, np.full(len(images), 0.5, np.float32), np.zeros((len(images), 4, 8), np.float32),
                             self.version)  # fmt: skip

    def receive(self, msg):
        ok = msg.key_id == "cloud-1"
        if ok:
            self.version = int(msg.version)
        return wire.new(wire.ADAPTER_STATUS, robot_id="r1", version=self.version,
                        state=wire.APPLIED if ok else wire.REJECTED, reason="" if ok else "unknown key")  # fmt: skip


class RecordingPort:
    def __init__(self):
        self.sent = []

    def publish(self, topic, data):
        self.sent.append((topic, bytes(data)))

    def decoded(self, topic):
        return [wire.decode(wire.topics.LINK_TOPICS[topic], d) for t, d in self.sent if t == topic]


@pytest.fixture(scope="module")
def student(tokenizer):
    from cdcca.models.checkpoint import build_pair
    from cdcca.models.presets import get_preset

    return build_pair(get_preset("test"), tokenizer, seed=0)[1].eval()


@pytest.fixture()
def runtime(student, tmp_path):
    clock, port = Clock(), RecordingPort()
    config = EdgeConfig(state_dir=tmp_path, batch_size=2, max_frame_age_s=1.0, queue_capacity=4, uts=NEVER_UPLOAD,
                        resend_after_s=5.0)  # fmt: skip
    private, public = generate_key(tmp_path / "keys", "cloud-1")  # acks are signed with the cloud's key
    trust_key(public, tmp_path / "trust")
    runtime = EdgeRuntime(FakeBackend(), student, config, port, clock=clock, trust=TrustStore.load(tmp_path / "trust"))
    runtime.clock, runtime.sent, runtime.signer = clock, port, Signer.load(private)
    yield runtime
    runtime.close()


def test_a_backend_without_its_own_token_sampler_needs_the_torch_encoder(tmp_path):
    with pytest.raises(ValueError, match="encoder_owner"):
        EdgeRuntime(FakeBackend(), None, EdgeConfig(state_dir=tmp_path))


# ---------------------------------------------------------------------------------------------- parameters


def test_parameters_are_the_config_fields_with_their_defaults_and_docs():
    values = params.default_parameters()
    assert params.validate_parameters({}) == values
    assert values["camera_topic"] == "/camera/camera/color/image_raw" and values["robot_id"] == "r1"
    assert all(len(spec.description) > 20 for spec in params.PARAMETERS)
    spec = params.SPECS["uts_token_keep_ratio"]
    assert (spec.owner, spec.field, spec.default) == (UTSConfig, "token_keep_ratio", UTSConfig().token_keep_ratio)
    assert params.SPECS["batch_size"].default == EdgeConfig().batch_size and not params.SPECS["batch_size"].read_only
    _, runtime = params.configs(params.validate_parameters({"uts_mc_passes": 7, "uts_mc_center": "deterministic"}))
    assert (runtime.uts.mc_passes, runtime.uts.mc_center) == (7, "deterministic")  # a robot short of compute
    doubles = [spec.name for spec in params.PARAMETERS if spec.kind == "double"]
    given = params.validate_parameters({name: 1 for name in doubles})  # ints are fine for doubles...
    assert all(type(given[name]) is float and given[name] == 1.0 for name in doubles)  # ...and come back as floats


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("robot_id", "r/1", "EdgeConfig.robot_id must be letters"),
        ("robot_id", "", "EdgeConfig.robot_id must be letters"),
        ("backend", "gpu", "EdgeNodeConfig.backend must be one of torch, onnx"),
        ("batch_size", 0, "EdgeConfig.batch_size must be >= 1"),
        ("batch_size", True, "batch_size must be a integer"),
        ("batch_size", 2.5, "batch_size must be a integer"),
        ("camera_topic", "/camera/color image", "camera_topic must be a ROS topic name"),
        ("camera_topic", "/c" * 124, "must be at most 247 characters"),  # 248: rcl refuses it (issue 14, #6)
        ("uts_sample_fraction", 0.0, "UTSConfig.sample_fraction"),
        ("uts_encoding", "int4", "UTSConfig.encoding must be one of"),
        ("uts_mc_center", "median", "UTSConfig.mc_center must be one of"),
        ("uts_mc_passes", 1, "UTSConfig.mc_passes is too small"),
        ("prompts", [], "EdgeConfig.prompts must be a non-empty list"),
        ("prompts", ["ok", " "], "EdgeConfig.prompts must be a non-empty list"),
        ("resend_after_s", 0.0, "EdgeConfig.resend_after_s must be > 0"),
        ("subscribe_compressed", "yes", "subscribe_compressed must be a bool"),
        ("no_such_parameter", 1, "unknown parameter 'no_such_parameter'"),
    ],
)  # fmt: skip
def test_invalid_parameters_are_refused_with_the_reason(name, value, message):
    assert message in params.check_parameter(name, value)
    with pytest.raises(params.ParameterError, match=name):
        params.validate_parameters({name: value})


def test_a_topic_of_247_characters_is_accepted():
    assert params.check_parameter("camera_topic", "/" + "c" * 246) is None


@pytest.mark.parametrize("field, value", [("robot_id", "7up"), ("queue_capacity", 0), ("pump_every_s", 0.0),
                                          ("ask_rate_hz", -1.0), ("prompt_capacity", 0), ("max_frame_age_s", -1)])
def test_edge_config_validates_every_field(field, value):
    with pytest.raises(ValueError, match=f"EdgeConfig.{field} must be"):
        EdgeConfig(**{field: value})


def test_parameter_file_and_runtime_settings(tmp_path, monkeypatch):
    path = tmp_path / "p.yaml"
    path.write_text("/**:\n  ros__parameters:\n    robot_id: r7\n    queue_capacity: 9\n    uts_encoding: fp16\n")
    values = params.validate_parameters(params.read_parameter_file(path))
    monkeypatch.setenv("CDCCA_CACHE", str(tmp_path / "cache"))
    node, config = params.configs(values)
    assert (config.robot_id, config.queue_capacity, config.uts.encoding) == ("r7", 9, "fp16")
    assert config.state_dir == tmp_path / "cache" / "edge" / "r7" and node.backend == "torch"
    (tmp_path / "other.yaml").write_text("/other_node:\n  ros__parameters: {a: 1}\n")
    with pytest.raises(params.ParameterError, match="no '/cdcca_edge: ros__parameters:'"):
        params.read_parameter_file(tmp_path / "other.yaml")


# --------------------------------------------------------------------------------------------------- frames


def test_latest_frame_converts_lazily_and_ages():
    clock = Clock()
    frame = LatestFrame(clock)
    with pytest.raises(NoFrameError, match="no camera frame"):
        frame.get()
    frame.update(image_to_msg(FRAME, 1_500, "cam", encoding="bgr8"))
    rgb, stamp, frame_id = frame.get(max_age_s=1.0)
    assert np.array_equal(rgb, FRAME) and (stamp, frame_id) == (1_500, "cam")
    assert frame.get()[0] is rgb  # converted once
    clock.now += 2.0
    assert frame.age_s() == pytest.approx(2.0)
    with pytest.raises(NoFrameError, match="2.0 s old"):
        frame.get(max_age_s=1.0)
    frame.update(compressed_to_msg(FRAME, "png", stamp_ns=7))
    assert np.array_equal(frame.get()[0], FRAME)
    bad = image_to_msg(FRAME)
    bad.encoding = "32FC1"  # float depth: not converted (16UC1 is, as grey)
    frame.update(bad)
    with pytest.raises(NoFrameError, match="unsupported image encoding"):
        frame.get()
    assert frame.bad == 1 and frame.received == 3


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "mono8", "png"])
def test_frames_decoded_from_cdr_are_writable_arrays_of_their_own(encoding):
    """Issue 14, #11: a read-only frame made torch warn on every answer."""
    msg = compressed_to_msg(FRAME, "png") if encoding == "png" else image_to_msg(FRAME, encoding=encoding)
    type_name = wire.COMPRESSED_IMAGE if encoding == "png" else wire.IMAGE
    rgb = msg_to_rgb(wire.decode(type_name, wire.encode(msg)))
    assert rgb.flags.writeable and rgb.flags.owndata and rgb.flags.c_contiguous and rgb.shape == (6, 5, 3)


# ------------------------------------------------------------------------------------------ runtime + port


def test_prompts_wait_for_a_first_frame_then_are_answered_in_batches(runtime):
    for text in ("a?", "b?", "c?"):
        runtime.on_prompt(wire.encode(wire.new(wire.STRING, data=text)))  # CDR bytes, as rclpy raw=True gives them
    assert runtime.answer_pending() == [] and runtime.pending() == 3
    assert EdgeDiagnostics(runtime).report().level == ERROR
    runtime.on_camera(wire.encode(image_to_msg(FRAME, 42, "camera_color_optical_frame")))
    first, second = runtime.answer_pending(), runtime.answer_pending()
    assert [a.prompt for a in first + second] == ["a?", "b?", "c?"]
    assert runtime.backend.batches == [["a?", "b?"], ["c?"]]
    assert all(a.header.frame_id == "camera_color_optical_frame" and wire.stamp_ns(a.header) == 42 for a in first)
    assert first[0].answer == f"seen {FRAME.mean():.1f}"
    ids = [a.sample_id for a in first + second]
    assert len(set(ids)) == 3 and all(i.startswith("r1-") for i in ids)
    assert [a.sample_id for a in runtime.sent.decoded("answer")] == ids  # published once, by the runtime
    assert runtime.counters.answers_published == 3


def test_stale_frames_drop_prompts_and_malformed_bytes_are_counted(runtime):
    runtime.on_camera(image_to_msg(FRAME))
    runtime.clock.now += 5.0
    runtime.on_prompt("what?")
    assert runtime.answer_pending() == [] and runtime.counters.prompts_dropped == 1 and runtime.pending() == 0
    runtime.on_camera(b"\x00\x01\x00\x00\xff")
    runtime.on_prompt(b"garbage")
    runtime.on_weight_delta(b"\x00")
    assert runtime.counters.malformed == 3 and runtime.counters.frames == 1
    report = EdgeDiagnostics(runtime).report()
    assert report.level == WARN and "5.0 s old" in report.message


def test_a_burst_past_the_prompt_capacity_is_counted(runtime):
    runtime.config.prompt_capacity = 5
    for i in range(8):
        runtime.on_prompt(f"q{i}?")
    assert runtime.pending() == 5 and runtime.counters.prompts_dropped == 3


def test_ask_uses_the_request_image_or_the_latest_frame(runtime):
    with pytest.raises(NoFrameError):
        runtime.ask_one("what digit?")
    runtime.on_camera(image_to_msg(FRAME, 9, "cam"))
    assert runtime.ask_one("what digit?").answer == f"seen {FRAME.mean():.1f}"
    other = np.full((4, 4, 3), 200, np.uint8)
    answer = runtime.ask_one("and this?", image_to_msg(other, 77, "request"))
    assert answer.answer == "seen 200.0" and answer.header.frame_id == "request"
    assert runtime.ask_one("empty image", wire.new(wire.IMAGE)).header.frame_id == "cam"  # width 0: latest frame
    with pytest.raises(ValueError, match="empty"):
        runtime.ask_one("  ")


def test_uplink_acks_deltas_and_statuses_through_the_port(runtime):
    for i in range(3):
        runtime.uplink.put(f"r1-{i}", 1.0 + i, f"payload-{i}".encode())
    assert runtime.pump() == 3
    assert sorted(d for t, d in runtime.sent.sent if t == "uts_tokens") == [b"payload-0", b"payload-1", b"payload-2"]
    runtime.publish_status()
    assert [(s.version, s.reason) for s in runtime.sent.decoded("adapter_status")] == [(3, "heartbeat")]
    foreign = sign_ack(runtime.signer, "r2", ["r1-0"], 1)
    assert runtime.on_ack(wire.encode(foreign)) == 0 and runtime.counters.acks_foreign == 1
    assert runtime.on_ack(sign_ack(runtime.signer, "r1", ["r1-0", "r1-1"], 2)) == 2
    assert runtime.uplink.ids() == ["r1-2"]
    diagnostics = EdgeDiagnostics(runtime)
    forged = wire.new(wire.WEIGHT_DELTA, robot_id="r1", version=4, base_version=3, key_id="mallory")
    assert runtime.on_weight_delta(wire.encode(forged)) and runtime.process_deltas() == 1
    status = runtime.sent.decoded("adapter_status")[-1]
    assert (status.state, status.reason) == (wire.REJECTED, "unknown key")
    report = diagnostics.report()
    assert report.level == WARN and "rejected" in report.message
    assert report.values["rejected_deltas"] == "1" and report.values["adapter_version"] == "3"
    assert report.values["uplink_queue_depth"] == "1"
    good = wire.new(wire.WEIGHT_DELTA, robot_id="r1", version=4, base_version=3, key_id="cloud-1")
    runtime.on_weight_delta(good)
    runtime.process_deltas()
    assert runtime.sent.decoded("adapter_status")[-1].state == wire.APPLIED and runtime.counters.deltas_applied == 1
    assert diagnostics.report().level == OK  # the rejection was reported once


def test_a_delta_for_another_robot_or_already_applied_is_no_rejection(runtime):
    """Issue 14, #10 (several robots on one graph) and #2 (a latched delta delivered again after re-activate)."""
    diagnostics = EdgeDiagnostics(runtime)
    delta = wire.new(wire.WEIGHT_DELTA, robot_id="r1", version=4, base_version=3, key_id="cloud-1")
    runtime.on_weight_delta(delta)
    runtime.process_deltas()
    before = len(runtime.sent.sent)
    assert not runtime.on_weight_delta(wire.new(wire.WEIGHT_DELTA, robot_id="r2", version=9, key_id="cloud-1"))
    runtime.on_weight_delta(delta)  # the same delta again
    runtime.process_deltas()
    assert len(runtime.sent.sent) == before  # no status at all
    assert (runtime.counters.deltas_foreign, runtime.counters.deltas_duplicate, runtime.counters.deltas_rejected) == (
        1, 1, 0)  # fmt: skip
    assert diagnostics.report().level == OK


def test_the_loop_answers_prompts_pumps_and_beats_without_polling(student, tmp_path):
    port = RecordingPort()
    config = EdgeConfig(state_dir=tmp_path, uts=NEVER_UPLOAD, pump_every_s=0.05, heartbeat_every_s=0.2)
    runtime = EdgeRuntime(FakeBackend(), student, config, port).start()
    try:
        runtime.uplink.put("r1-0", 1.0, b"payload")
        runtime.on_camera(image_to_msg(FRAME))
        for i in range(5):
            runtime.on_prompt(f"q{i}?")
        deadline = time.monotonic() + 5
        while (runtime.counters.answers_published < 5 or not runtime.counters.uplink_published) and (
                time.monotonic() < deadline):  # fmt: skip
            time.sleep(0.01)
        assert [a.prompt for a in port.decoded("answer")] == [f"q{i}?" for i in range(5)]
        assert ("uts_tokens", b"payload") in port.sent
        beats = lambda: [m for m in port.decoded("adapter_status") if m.reason == "heartbeat"]  # noqa: E731
        assert wait_until(lambda: len(beats()) >= 3, 10)
        stamps = [m.header.stamp.sec + m.header.stamp.nanosec * 1e-9 for m in beats()]
        gaps = np.diff(stamps)  # a heartbeat every 0.2 s: load only widens a gap, and not most of them by 2.5x
        assert min(gaps) > 0.15 and np.median(gaps) < 0.5, gaps
        # idle: < 5 % of a core for the runtime's own threads (the process's other threads are not its doing)
        threads = [t for t in threading.enumerate() if t.name.startswith("edge-")]
        assert threads
        cpu = lambda: sum(time.clock_gettime(time.pthread_getcpuclockid(t.ident)) for t in threads)  # noqa: E731
        started, began = cpu(), time.monotonic()
        time.sleep(1.0)
        assert cpu() - started < 0.05 * (time.monotonic() - began)
    finally:
        runtime.close()
    assert not any(t.name.startswith("edge-") for t in threading.enumerate())


def test_ask_rate_asks_the_prompts_about_the_latest_frame(student, tmp_path):
    port = RecordingPort()
    config = EdgeConfig(state_dir=tmp_path, uts=NEVER_UPLOAD, ask_rate_hz=20.0, prompts=("p?",))
    runtime = EdgeRuntime(FakeBackend(), student, config, port)
    runtime.on_camera(image_to_msg(FRAME))
    began = time.monotonic()
    runtime.start()
    assert wait_until(lambda: len(port.decoded("answer")) >= 4, 10)
    runtime.close()
    answers = port.decoded("answer")
    elapsed = time.monotonic() - began  # 20 Hz: neither faster, nor (loaded or not) below a quarter of it
    assert 5 * elapsed <= len(answers) <= 20 * elapsed + 2 and {a.prompt for a in answers} == {"p?"}, elapsed


def test_a_failing_port_is_counted_and_answering_goes_on(runtime):
    class Broken:
        def publish(self, topic, data):
            raise RuntimeError("publisher gone")

    runtime.connect(Broken())
    runtime.on_camera(image_to_msg(FRAME))
    assert runtime.ask_one("q?").answer.startswith("seen")
    assert runtime.counters.publish_errors == 1 and runtime.counters.answers_published == 0


def test_a_robot_that_starts_before_its_zenoh_router_answers_keeps_its_uploads_and_catches_up(runtime, caplog):
    from cdcca.edge.observe import status_text
    from cdcca.edge.ports import ZenohPort
    from cdcca.transport import Link, LinkConfig
    from tests.test_transport import free_port

    caplog.set_level("INFO", logger="cdcca")
    # Arrange: a client link whose router is not up; two uploads queued
    endpoint = f"tcp/127.0.0.1:{free_port()}"
    link = Link(LinkConfig(mode="client", connect=[endpoint]), connect_later=True)
    router = cloud = None
    try:
        runtime.connect(ZenohPort(link, "r1"))
        for i in range(2):
            runtime.uplink.put(f"r1-{i}", 1.0 + i, f"payload-{i}".encode())
        runtime.on_camera(image_to_msg(FRAME))
        # Act / Assert: it answers; the answers and uploads the link refuses are counted, logged once, kept queued
        assert all(runtime.ask_one(f"q{i}?").answer.startswith("seen") for i in range(3))
        assert runtime.pump() == 0 and sorted(runtime.uplink.ids()) == ["r1-0", "r1-1"]
        assert runtime.counters.publish_errors == 4 and runtime.counters.answers_published == 0
        assert caplog.text.count("publishing answer failed") == 1 and caplog.text.count("publishing uts_tokens") == 1
        stats = runtime.stats()
        assert stats["link_connected"] is False and EdgeDiagnostics(runtime).report().values["publish_errors"] == "4"
        assert "link connecting (" in status_text(runtime)
        # the router and the cloud come up: the robot connects, uploads go out, a delta comes in
        router = Link(LinkConfig(mode="router", listen=[endpoint]))
        cloud = Link(LinkConfig(mode="client", connect=[endpoint]))
        uploads = []
        cloud.subscribe("r1", "uts_tokens", lambda robot_id, msg, data: uploads.append(msg))
        assert wait_until(lambda: link.matched("r1", "uts_tokens") and cloud.matched("r1", "weight_delta"), timeout=20)
        runtime.clock.now += 60  # past the pump's backoff
        assert runtime.pump() == 2  # sent; they are not UtsTokens, so the cloud's link drops them, as it must
        assert wait_until(lambda: cloud.rejected["uts_tokens"] == 2)
        cloud.publish("r1", "weight_delta", wire.new(wire.WEIGHT_DELTA, robot_id="r1", version=4, base_version=3,
                                                     key_id="cloud-1"))  # fmt: skip
        assert wait_until(lambda: runtime.process_deltas() == 1)
        assert runtime.backend.version == 4 and "publishing answer works again" not in caplog.text  # none asked yet
        assert "publishing uts_tokens works again" in caplog.text and runtime.stats()["link_connected"] is True
        runtime.on_camera(image_to_msg(FRAME))
        assert runtime.ask_one("again?").answer.startswith("seen") and runtime.counters.answers_published == 1
        assert "publishing answer works again" in caplog.text and "link connecting" not in status_text(runtime)
    finally:
        runtime.connect(None)
        link.close()
        for other in (cloud, router):
            if other is not None:
                other.close()


def test_a_port_that_refuses_does_not_keep_a_message_from_the_others():
    from cdcca.edge.ports import FanOut

    class Refusing:
        topics = frozenset({"answer", "uts_tokens"})

        def publish(self, topic, data):
            raise RuntimeError("no router yet")

    ros = RecordingPort()
    ros.topics = frozenset({"answer"})
    with pytest.raises(RuntimeError, match="no router yet"):
        FanOut(Refusing(), ros).publish("answer", b"a")
    assert ros.sent == [("answer", b"a")]  # the ROS graph still gets the answer


def test_diagnostics_report_rate_and_a_full_queue(runtime):
    runtime.on_camera(image_to_msg(FRAME))
    for _ in range(4):
        runtime.on_prompt("q?")
    runtime.clock.now += 1.0
    runtime.answer_pending()
    runtime.answer_pending()
    for i in range(4):
        runtime.uplink.put(f"s{i}", 1.0, b"x")
    report = EdgeDiagnostics(runtime).report()
    assert report.values["answer_rate_hz"] == "4.00" and float(report.values["latency_ms_mean"]) >= 0
    assert report.values["uplink_queue_depth"] == "4" and "nearly full" in report.message
    assert math.isnan(AnswerMeter(window_s=10.0, clock=Clock()).latency_ms()[0])


def test_the_core_has_no_import_circles():
    """Imports between cdcca modules, deferred ones included, form no cycle through the edge, the transports or the
    wire format (issue 14: app -> transport.dds -> ros_glue -> app). Imports only for type checkers do not count."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    modules = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
               for p in (root / "cdcca").rglob("*.py")}  # fmt: skip
    graph = {}
    for name, path in modules.items():
        targets = set()
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(block.test) for n in ast.walk(block)}  # fmt: skip
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            targets |= {n for n in names if n in modules and n != name and not n.startswith(name + ".")}
        graph[name] = targets  # (a package's __init__ importing its own submodules is no circle)
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    edge_cycles = [c for c in cycles if any(m.startswith(("cdcca.edge", "cdcca.transport", "cdcca.wire")) for m in c)]
    assert edge_cycles == []
