"""``cdcca edge --source bag:`` on bags made the way ``ros2 bag record`` makes them: a camera, no prompt topic."""

import json
import logging
import socket

import numpy as np
import pytest

from cdcca import wire
from cdcca.bag import CAMERA_TOPIC, BagWriter, image_to_msg
from cdcca.cli import main
from cdcca.edge.app import EXIT_NO_CLOUD as NO_CLOUD
from cdcca.edge.app import edge_exit_reason

DEPTH_TOPIC = "/camera/camera/depth/image_rect_raw"
FRAME_PERIOD_NS = 250_000_000  # a 4 Hz camera
FRAMES = 3
START_NS = 1_700_000_000 * 10**9


def _rgb(index: int) -> np.ndarray:
    return np.full((8, 8, 3), 40 * index, np.uint8)  # (H, W, 3)


def _depth(stamp_ns: int):  # float depth in metres: an encoding CD-CCA does not convert (16UC1 it shows as grey)
    return wire.new(wire.IMAGE, header=wire.header(stamp_ns, "depth"), height=1, width=1, encoding="32FC1",
                    step=4, data=np.zeros(4, np.uint8))  # fmt: skip


def _record(path, rgb: bool = True, depth: bool = False, rgb_topic: str = CAMERA_TOPIC):
    """A bag like ``ros2 bag record`` of realsense2_camera: rgb8 and/or 32FC1 depth frames, nothing of CD-CCA's."""
    with BagWriter(path, "mcap") as bag:
        for index in range(FRAMES):
            stamp = START_NS + index * FRAME_PERIOD_NS
            if depth:
                bag.write(DEPTH_TOPIC, _depth(stamp), stamp)
            if rgb:
                bag.write(rgb_topic, image_to_msg(_rgb(index), stamp, "camera_color_optical_frame"), stamp + 1)
    return path


def _free_endpoint() -> str:
    with socket.socket() as probe:  # a port no cloud listens on: the robot runs offline
        probe.bind(("127.0.0.1", 0))
        return f"tcp/127.0.0.1:{probe.getsockname()[1]}"


@pytest.fixture()
def edge(pretrained_test_pair, trust_dir, tmp_path):
    """``cdcca edge --source SOURCE EXTRA...`` in-process, offline: (exit code, its --json report or None)."""

    def run(source: str, *extra: str) -> tuple[int, dict | None]:
        return _edge(pretrained_test_pair, tmp_path, trust_dir, source, *extra)

    return run


def _edge(pretrained_test_pair, tmp_path, trust_dir, source: str, *extra: str) -> tuple[int, dict | None]:
    report = tmp_path / "report.json"
    code = main(["edge", "--checkpoints", str(pretrained_test_pair), "--source", source,
                 "--state", str(tmp_path / "state"), "--trust", str(trust_dir),
                 "--endpoint", _free_endpoint(), "--linger", "0", "--json", str(report), *extra])  # fmt: skip
    return code, json.loads(report.read_text()) if report.exists() else None


@pytest.mark.parametrize(("rate", "min_seconds"), [("1", 0.5), ("2", 0.25)])
def test_a_recorded_bag_is_asked_every_prompt_at_the_recorded_rate(edge, tmp_path, rate, min_seconds):
    bag = _record(tmp_path / "recorded")

    code, report = edge(f"bag:{bag}", "--prompt", "what digit?",
                         "--prompt", "what colour?", "--rate", rate)  # fmt: skip

    assert code == NO_CLOUD
    assert report["queries"] == FRAMES * 2
    assert report["ground_truth"] == {}  # an ordinary recording carries no ground truth
    assert report["answers"] == FRAMES * 2
    assert report["seconds"] >= min_seconds  # (FRAMES - 1) frame periods / rate


def test_an_unsupported_only_camera_is_one_error_line_and_exit_2(edge, tmp_path, capsys, caplog):
    bag = _record(tmp_path / "depth_only", rgb=False, depth=True)

    with caplog.at_level(logging.WARNING):
        code, report = edge(f"bag:{bag}", "--prompt", "what digit?")

    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert code == 2 and report is None
    assert len(errors) == 1 and "32FC1" in errors[0] and DEPTH_TOPIC in errors[0]
    assert not [r for r in caplog.records if "skipping" in r.getMessage()]


@pytest.mark.parametrize(("rgb_topic", "warned"), [(CAMERA_TOPIC, 0), ("/camera/image_raw", 1)])
def test_an_unsupported_topic_is_skipped_with_one_warning_when_another_works(edge, tmp_path, caplog, rgb_topic,
                                                                             warned):  # fmt: skip
    """A colour-named topic is tried first, so the depth topic is never decoded; under a neutral name the depth
    topic, recorded first, is tried first and skipped with one warning."""
    bag = _record(tmp_path / "rgb_and_depth", depth=True, rgb_topic=rgb_topic)

    with caplog.at_level(logging.WARNING):
        code, report = edge(f"bag:{bag}", "--prompt", "what digit?", "--rate", "0")

    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    warnings = [m for m in messages if DEPTH_TOPIC in m]
    assert code == NO_CLOUD
    assert report["queries"] == FRAMES
    assert len(warnings) == warned and all("32FC1" in w for w in warnings)


@pytest.mark.parametrize(("topic", "code"), [(CAMERA_TOPIC, NO_CLOUD), (DEPTH_TOPIC, 2), ("/no/such/topic", 2)])
def test_the_camera_topic_can_be_chosen_after_a_hash(edge, tmp_path, topic, code):
    bag = _record(tmp_path / "rgb_and_depth", depth=True)

    got, report = edge(f"bag:{bag}#{topic}", "--prompt", "what digit?", "--rate", "0")

    assert got == code
    assert (report["queries"] if report else None) == (FRAMES if code == NO_CLOUD else None)


def test_the_robot_exits_at_the_end_after_a_bounded_wait_for_the_cloud(edge, tmp_path, capsys, caplog):
    bag = _record(tmp_path / "recorded")

    with caplog.at_level(logging.WARNING):
        code, report = edge(f"bag:{bag}", "--prompt", "what digit?", "--rate", "0", "--linger", "1")

    out, err = capsys.readouterr()
    summary = [line for line in out.splitlines() if line.startswith("robot r1:")]
    unacked = [r.getMessage() for r in caplog.records if "did not acknowledge" in r.getMessage()]
    assert code == NO_CLOUD  # answers were made, the cloud side of the loop was not: the exit code says so
    assert [line for line in err.splitlines() if line.startswith("cdcca edge: warning:")] == [
        f"cdcca edge: warning: {edge_exit_reason(report)}"]
    assert "no cloud was reached" in err
    assert report["uplink_enqueued"] > 0 and report["uplink_acked"] == 0  # no cloud listens: all stay queued
    assert report["seconds"] >= 1.0
    assert unacked == [f"the cloud did not acknowledge {report['uplink_queued']} queued samples within 1 s; "
                       f"they stay queued in {tmp_path / 'state'}"]  # fmt: skip
    assert summary == [f"robot r1: {FRAMES} queries, {FRAMES} answers, {report['uplink_enqueued']} samples queued "
                       f"for the cloud, 0 acknowledged, {report['uplink_queued']} still queued, adapter v0 "
                       f"({report['seconds']:.1f} s)"]  # fmt: skip


def test_a_bag_with_its_own_prompts_is_asked_those_not_prompt(edge, tmp_path):
    from cdcca.bag import make_stream_bag

    summary = make_stream_bag(tmp_path / "stream", domains=("printed",), limit=2)

    code, report = edge(f"bag:{summary.path}", "--prompt", "ignored?", "--rate", "0")

    assert code == NO_CLOUD
    assert report["queries"] == summary.counts["/cdcca/prompt"] == 2 * 3  # 2 images x 3 tasks
    truth = report["ground_truth"]  # VQA and MC answers scored against the bag's ground truth; captions are not
    assert truth["scored"] == 2 * 2 and list(truth["by_version"]) == ["0"]
    assert 0.0 <= truth["accuracy"] <= 100.0 and truth["by_version"]["0"]["answers"] == 4


def test_a_negative_rate_is_one_error_line_and_exit_2(edge, tmp_path, capsys):
    bag = _record(tmp_path / "recorded")

    try:
        code, report = edge(f"bag:{bag}", "--rate", "-1")
    except SystemExit as exit_:  # refused while parsing the options, as argparse does
        code, report = exit_.code, None

    last = capsys.readouterr().err.splitlines()[-1]
    assert code == 2 and report is None
    assert last.startswith("cdcca edge") and "error:" in last and "rate" in last and "-1" in last


def test_prompts_come_from_a_file_and_the_topic_from_topic(edge, tmp_path):
    bag = _record(tmp_path / "rgb_and_depth", depth=True)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# asked about every frame\nwhat digit?\n\nwhat colour?\n")

    code, report = edge(f"bag:{bag}", "--prompts-file", str(prompts), "--topic", CAMERA_TOPIC, "--rate", "0")

    assert code == NO_CLOUD  # answered; no cloud listens here
    assert report["queries"] == report["answers"] == FRAMES * 2  # two prompts from the file, comment skipped


@pytest.mark.parametrize(("extra", "says"), [
    (["--prompts-file", "{tmp}/none.txt"], "--prompts-file"),
    (["--prompts-file", "{tmp}/empty.txt"], "holds no prompt"),
    (["--topic", "/x"], "--topic goes with --source bag:PATH"),
])  # fmt: skip
def test_a_bad_prompts_file_or_topic_is_one_line_and_exit_2(edge, tmp_path, capsys, extra, says):
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    bag = _record(tmp_path / "recorded")
    source = f"bag:{bag}#{CAMERA_TOPIC}" if "--topic" in extra else f"bag:{bag}"

    code, report = edge(source, *[part.format(tmp=tmp_path) for part in extra])

    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and report is None
    assert len(errors) == 1 and says in errors[0]


def test_answers_are_scored_against_the_bags_ground_truth_per_adapter_version(tmp_path):
    from types import SimpleNamespace

    from cdcca.bag import make_stream_bag
    from cdcca.edge.app import TruthScore

    summary = make_stream_bag(tmp_path / "stream", domains=("printed",), limit=3)
    score = TruthScore(summary.path)
    records = {sid: r for sid, r in score.truth.items() if r["task"] in ("vqa", "mc")}
    right = {"vqa": lambda r: r["answers"][0], "mc": lambda r: r["choices"][r["correct_idx"]]}

    score([SimpleNamespace(sample_id=sid, answer=right[r["task"]](r), adapter_version=0) for sid, r in records.items()])
    score([SimpleNamespace(sample_id=sid, answer="no idea at all", adapter_version=1) for sid in records])
    score([SimpleNamespace(sample_id="not-in-the-bag", answer="x", adapter_version=1)])

    report = score.report()
    assert len(score.truth) == 3 * 3 and len(records) == 3 * 2  # every prompt has its record; captions unscored
    assert report["by_version"][0]["accuracy"] == 100.0 and report["by_version"][1]["accuracy"] == 0.0
    assert report["scored"] == 2 * len(records) and report["accuracy"] == 50.0


def test_a_folder_without_one_readable_frame_is_an_error_not_a_run(edge, tmp_path, capsys):
    frames = tmp_path / "frames"
    frames.mkdir()
    (frames / "0001.png").write_bytes(b"not a png")

    code, report = edge(f"dir:{frames}")

    assert code == 2 and report is None
    assert "not one frame could be read (1 skipped" in capsys.readouterr().err
