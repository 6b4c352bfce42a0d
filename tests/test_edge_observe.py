"""Seeing the robot (issue 17, §2): answers on stdout and in JSONL, Prometheus metrics scraped over HTTP, the cloud's
presence on a real Zenoh link (a warning within seconds when it is missing), the robot's DiagnosticArray on the link,
and a ROS camera topic without publisher."""

import json
import logging
import threading
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from cdcca import wire
from cdcca.edge.app import EXIT_NO_CLOUD, ReplaySettings, build_runtime, edge_exit_code, edge_exit_reason, replay
from cdcca.edge.observe import CloudWatch, EdgeMetrics, answer_line
from cdcca.edge.runtime import EdgeConfig
from cdcca.envelope import trust_key
from cdcca.transport import Link, LinkConfig
from cdcca.uts import UTSConfig
from cdcca.wire.topics import ROBOT_STATUS_KEYS
from tests.test_transport import free_port, wait_until

ALL_SAMPLES = UTSConfig(sample_mode="threshold", entropy_threshold=-1.0)


@pytest.fixture()
def make_robot(pretrained_test_pair, trust_dir, tmp_path):
    made = []

    def make(robot_id: str = "r1", link=None, **config):
        config = EdgeConfig(robot_id=robot_id, state_dir=tmp_path / robot_id, uts=ALL_SAMPLES, **config)
        runtime = build_runtime(pretrained_test_pair, config, trust_dir, link)
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        runtime.close()


def _folder(path, count: int = 3):
    path.mkdir()
    rng = np.random.default_rng(0)
    for k in range(count):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(path / f"frame{k}.png")
    return path


def test_answers_are_printed_one_line_each_and_appended_as_jsonl(make_robot, tmp_path, capsys):
    # Prepare
    robot = make_robot()
    answers_file = tmp_path / "out" / "answers.jsonl"
    answers_file.parent.mkdir()
    answers_file.write_text('{"earlier": "run"}\n')  # appended to, never truncated
    settings = ReplaySettings(f"dir:{_folder(tmp_path / 'frames')}", ("what digit?", "what colour?"), batch_size=4,
                              linger_s=0.0, show_answers=True, answers_file=answers_file)  # fmt: skip

    # Execute
    report = replay(robot, settings, threading.Event())

    # Assert
    printed = [line for line in capsys.readouterr().out.splitlines() if "->" in line]
    records = [json.loads(line) for line in answers_file.read_text().splitlines()]
    assert report["answers"] == 6 and len(printed) == 6 and len(records) == 1 + 6
    assert records[0] == {"earlier": "run"}
    assert {r["prompt"] for r in records[1:]} == {"what digit?", "what colour?"}
    for line, record in zip(printed, records[1:], strict=True):
        assert json.dumps(record["prompt"]) in line and json.dumps(record["answer"]) in line
        assert f"adapter v{record['adapter_version']}" in line and "entropy " in line
        assert f" {record['sample_id']} " in line and record["sample_id"].startswith("frame")
        assert set(record) >= {"sample_id", "stamp_ns", "answer", "entropy", "adapter_version", "latency_ms"}
    assert report["cloud_expected"] is False and edge_exit_code(report) == 0


def test_an_unwritable_answers_file_is_one_clear_error(tmp_path):
    from cdcca.edge.observe import AnswerSink

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=r"cannot append answers to .*a-file/answers.jsonl: .*--answers-file"):
        AnswerSink(path=blocker / "answers.jsonl")


def test_an_answer_line_never_breaks_and_shows_a_failed_answer():
    msg = wire.new(wire.ANSWER, header=wire.header(1_500_000_000, "cam"), sample_id="bag@7#0", prompt="two\nlines",
                   answer="", entropy=float("nan"), adapter_version=3)  # fmt: skip
    line = answer_line(msg)
    assert line == '[1.500 cam] bag@7#0 "two lines" -> "" (entropy nan (failed), adapter v3)'


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def test_two_runtimes_serve_their_own_prometheus_metrics(make_robot):
    # Prepare: two robots in one process, each with its own registry and port
    first, second = make_robot("r1"), make_robot("r2")
    metrics = [EdgeMetrics(first, free_port(), "127.0.0.1"), EdgeMetrics(second, free_port(), "127.0.0.1")]
    first.answer_listeners.append(metrics[0].observe)
    rng = np.random.default_rng(1)
    first.ask([rng.integers(0, 255, (32, 32, 3), np.uint8)] * 3, ["what digit?"] * 3)
    first.record_fault("bad_image", "cannot read image x.jpg")

    # Execute
    try:
        one, two = _scrape(metrics[0].port), _scrape(metrics[1].port)
    finally:
        for served in metrics:
            served.close()

    # Assert
    assert 'cdcca_edge_answers_total{robot="r1"} 3.0' in one
    # three prompts about one frame: one upload carries them all
    assert 'cdcca_edge_uploads_enqueued_total{robot="r1"} 1.0' in one
    assert 'cdcca_edge_uplink_queue_depth{robot="r1"} 1.0' in one
    assert 'cdcca_edge_faults_total{kind="bad_image",robot="r1"} 1.0' in one
    assert 'cdcca_edge_answer_latency_seconds_count{robot="r1"} 3.0' in one
    assert 'cdcca_edge_cloud_up{robot="r1"} 0.0' in one and 'cdcca_edge_adapter_version{robot="r1"} 0.0' in one
    assert 'cdcca_edge_answers_total{robot="r2"} 0.0' in two and 'robot="r1"' not in two


def test_a_metrics_port_in_use_or_a_foreign_address_is_one_error_naming_the_flag(make_robot):
    robot = make_robot()
    taken = EdgeMetrics(robot, free_port(), "127.0.0.1")
    try:
        with pytest.raises(ValueError, match=f"cannot serve metrics on 127.0.0.1:{taken.port}.*--metrics-port"):
            EdgeMetrics(robot, taken.port, "127.0.0.1")
    finally:
        taken.close()
    with pytest.raises(ValueError, match=r"cannot serve metrics on 999\.1\.1\.1:.*pick another --metrics-address"):
        EdgeMetrics(robot, free_port(), "999.1.1.1")  # no such address: the port was never the problem


def test_cloud_presence_warns_within_seconds_then_reports_up_and_down(make_robot, caplog):
    # Prepare: a robot whose cloud is not there yet, and a monitor that reads the robots' diagnostics
    endpoint = f"tcp/127.0.0.1:{free_port()}"
    robot_link = Link(LinkConfig.loopback(False, endpoint))
    robot = make_robot(link=robot_link, cloud_warn_after_s=1.0, diagnostics_every_s=0.2)
    caplog.set_level(logging.INFO, logger="cdcca.edge")
    started = time.monotonic()
    robot.start()
    cloud = None
    try:
        # Execute / Assert: no cloud -> one clear warning within seconds
        missing = f"no cloud at {endpoint} for "
        assert wait_until(lambda: any(missing in r.getMessage() for r in caplog.records), 5)
        assert time.monotonic() - started < 4
        warning = next(r for r in caplog.records if missing in r.getMessage())
        assert warning.levelno == logging.WARNING
        assert "answers continue, uploads are kept (0 queued)" in warning.getMessage()
        assert robot.stats()["cloud_reached"] is False

        # the cloud comes: declared presence, and it sees the robot's DiagnosticArray on the link
        cloud = Link(LinkConfig.loopback(True, endpoint))
        seen = []
        cloud.subscribe("*", "diagnostics", lambda robot_id, msg, _: seen.append((robot_id, msg)))
        cloud.declare_presence("cloud")
        assert wait_until(lambda: robot.cloud.up, 10)
        assert wait_until(lambda: any(m for _, m in seen if _values(m).get("cloud") == "up"), 10)
        assert any(f"cloud at {endpoint} is up" in r.getMessage() for r in caplog.records)
        robot_id, msg = seen[-1]
        values = _values(msg)
        assert robot_id == "r1" and msg.status[0].hardware_id == "r1"
        assert set(ROBOT_STATUS_KEYS) <= set(values) and values["adapter_version"] == "0"
        assert robot.stats()["cloud_reached"] is True

        # the cloud goes away
        cloud.close()
        assert wait_until(lambda: not robot.cloud.up, 10)
        assert wait_until(lambda: any("lost the cloud" in r.getMessage() for r in caplog.records), 5)
    finally:
        robot.stop()
        robot_link.close()
        if cloud is not None:
            cloud.close()


def _values(msg) -> dict:
    return {pair.key: pair.value for pair in msg.status[0].values}


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_cloud_watch_backs_off_and_acks_alone_never_claim_the_cloud_left(caplog):
    clock = Clock()
    watch = CloudWatch("tcp/cloud:7447", queued=lambda: 7, warn_after_s=5.0, clock=clock)
    caplog.set_level(logging.INFO, logger="cdcca.edge.observe")
    warned_at = []
    for _ in range(41 * 8):  # 41 s in steps of 1/8 s (exact in binary)
        clock.now += 0.125
        before = len(caplog.records)
        watch.check()
        if len(caplog.records) > before:
            warned_at.append(round(clock.now - 100.0))
    assert warned_at == [5, 10, 20, 40]  # then every doubling, not every check
    assert "(7 queued)" in caplog.records[0].getMessage()

    watch.heard("ack")  # an old cloud: acks only
    clock.now += 3600
    assert watch.check() and watch.reached
    assert not any("lost the cloud" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("report", "code", "reason"),
    [
        ({"cloud_expected": True, "cloud_reached": False, "recording": False, "uplink_queued": 2}, EXIT_NO_CLOUD,
         "no cloud was reached at tcp/10.0.0.2:7447; answers were made, 2 uploads stay queued"),
        ({"cloud_expected": True, "cloud_reached": True, "recording": True, "uplink_queued": 2}, EXIT_NO_CLOUD,
         "the cloud did not acknowledge 2 uploads before the end"),
        ({"cloud_expected": True, "cloud_reached": True, "recording": True, "uplink_queued": 0}, 0, None),
        ({"cloud_expected": True, "cloud_reached": True, "recording": False, "uplink_queued": 5}, 0, None),
        ({"cloud_expected": False, "cloud_reached": False, "recording": False}, 0, None),
    ],
)  # fmt: skip
def test_the_exit_code_says_whether_the_cloud_was_reached(report, code, reason):
    from cdcca.edge.app import edge_exit_reason

    said = edge_exit_reason({**report, "cloud_endpoint": "tcp/10.0.0.2:7447"})
    assert edge_exit_code(report) == code
    assert said is None if reason is None else said.startswith(reason) and "\n" not in said


def test_a_ros_camera_topic_without_publisher_is_a_warning_not_silence(make_robot, caplog):
    from cdcca.edge.dds_port import DdsEdgeSettings, run_dds_edge
    from cdcca.transport.dds import loopback_config
    from tests.test_dds import free_domain_id

    robot = make_robot()
    stop = threading.Event()
    topic = "/nobody/publishes/this"
    settings = DdsEdgeSettings(domain_id=free_domain_id(3), config=loopback_config(), no_frames_warning_s=0.5)
    caplog.set_level(logging.WARNING, logger="cdcca.edge.dds_port")
    thread = threading.Thread(target=run_dds_edge, args=(robot, topic, stop, settings), daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: len([r for r in caplog.records if topic in r.getMessage()]) >= 2, 60), \
            "no two warnings within 60 s: is the DDS edge thread alive? " + str(thread.is_alive())
    finally:
        stop.set()
        thread.join(timeout=10)
    first = next(r.getMessage() for r in caplog.records if topic in r.getMessage())
    assert "no camera frame" in first and "no publisher" in first and f"ROS domain {settings.domain_id}" in first


def test_the_status_line_is_rewritten_in_place_on_a_terminal_only(make_robot, tmp_path):
    import os

    from cdcca.edge.observe import StatusLine

    robot = make_robot()
    robot.ask([np.zeros((32, 32, 3), np.uint8)] * 2, ["what digit?"] * 2)
    main, secondary = os.openpty()  # a real pseudo-terminal
    terminal = open(secondary, "w")  # noqa: SIM115
    try:
        line = StatusLine(robot, terminal, every_s=0.05).start()
        time.sleep(0.3)
        line.stop()
        shown = os.read(main, 65536).decode()
    finally:
        terminal.close()
        os.close(main)
    frames = [f for f in shown.split("\r\x1b[K") if f]
    assert len(frames) >= 2 and "\n" not in shown  # rewritten in place, never scrolling
    assert frames[0].startswith("r1 | 2 answers, ")
    assert "uplink 1 queued, 0 acked | adapter v0 | cloud offline" in frames[0]  # two prompts, one frame

    with open(tmp_path / "not-a-terminal.txt", "w") as plain:
        assert StatusLine(robot, plain, every_s=0.05).start()._thread is None


def test_a_bag_replayed_against_a_real_cloud_reaches_it_and_exits_0(pretrained_test_pair, tmp_path, caplog):
    """The whole robot path with a running cloud trainer on loopback: every upload acknowledged, cloud reached."""
    from cdcca.envelope import generate_key as make_key
    from tests.test_edge_encodings import record
    from tests.test_loop_faults import Cloud

    private, public = make_key(tmp_path / "keys", "cloud-test")
    trust_key(public, tmp_path / "trust")
    setup = {"checkpoints": pretrained_test_pair, "key": private, "tmp": tmp_path,
             "endpoint": f"tcp/127.0.0.1:{free_port()}"}  # fmt: skip
    cloud = Cloud(setup, round_size=256)  # acknowledges, never trains here
    link = Link(LinkConfig.loopback(False, setup["endpoint"]))
    config = EdgeConfig(state_dir=tmp_path / "edge", uts=ALL_SAMPLES, resend_after_s=0.5, log_every_s=0.5)
    runtime = build_runtime(pretrained_test_pair, config, tmp_path / "trust", link)
    caplog.set_level(logging.INFO, logger="cdcca.edge")
    try:
        report = replay(runtime, ReplaySettings(f"bag:{record(tmp_path / 'bag', 'bgra8', frames=4)}", ("what?",),
                                                speed=0.0, linger_s=30.0), threading.Event())  # fmt: skip
        drained = lambda: [m for m in (r.getMessage() for r in caplog.records)  # noqa: E731
                           if "cloud acknowledged" in m and m.endswith(", 0 queued)")]  # fmt: skip
        assert wait_until(drained, 5)
    finally:
        runtime.close()
        link.close()
        cloud.stop()
    assert (report["answers"], report["uplink_enqueued"], report["uplink_queued"]) == (4, 4, 0)
    assert report["cloud_reached"] is True and edge_exit_code(report) == 0
    assert "(4 acknowledged in all, 0 queued)" in drained()[-1]


def test_offline_adaptation_from_a_bag_ends_with_the_adapted_version_applied(pretrained_test_pair, tmp_path):
    """`cdcca edge --source bag:… --wait-updates 1` against a cloud that trains: the run ends on the new version."""
    from cdcca.envelope import generate_key as make_key
    from tests.test_edge_encodings import record
    from tests.test_loop_faults import Cloud

    private, public = make_key(tmp_path / "keys", "cloud-test")
    trust_key(public, tmp_path / "trust")
    setup = {"checkpoints": pretrained_test_pair, "key": private, "tmp": tmp_path,
             "endpoint": f"tcp/127.0.0.1:{free_port()}"}  # fmt: skip
    cloud = Cloud(setup, round_size=4)  # the bag's 4 uploads make one (3-step) round
    link = Link(LinkConfig.loopback(False, setup["endpoint"]))
    config = EdgeConfig(state_dir=tmp_path / "edge", uts=ALL_SAMPLES, resend_after_s=0.5)
    runtime = build_runtime(pretrained_test_pair, config, tmp_path / "trust", link)
    try:
        settings = ReplaySettings(f"bag:{record(tmp_path / 'bag', 'rgb8', frames=4)}", ("what?",), speed=0.0,
                                  linger_s=120.0, wait_updates=1)  # fmt: skip
        report = replay(runtime, settings, threading.Event())
    finally:
        runtime.close()
        link.close()
        cloud.stop()
    assert (report["answers"], report["uplink_queued"], report["start_version"]) == (4, 0, 0)
    assert report["adapter_version"] == 1 and report["updates_waited_for"] == 1
    assert edge_exit_code(report) == 0 and edge_exit_reason(report) is None
    assert edge_exit_reason({**report, "adapter_version": 0}).startswith("the cloud acknowledged every upload")
