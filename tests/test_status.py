"""``cdcca status`` over a real Zenoh link on loopback: robots' and the cloud's DiagnosticArray, AdapterStatus and
WeightDelta messages become one row per robot and the cloud's line."""

import contextlib
import io
import json
import threading

import pytest

from cdcca import wire
from cdcca.envelope import seal
from cdcca.status import StatusMonitor, plain_table, run_status
from cdcca.transport import Link, LinkConfig
from cdcca.wire import DIAGNOSTIC_ARRAY
from cloud_trainer.status import ROBOT_NAME, WORKER_NAME, _status
from tests.test_cloud_shutdown import private_endpoint
from tests.test_transport import wait_until


def put(link: Link, robot_id: str, topic: str, msg) -> None:
    link.publish_bytes(robot_id, topic, wire.encode(msg))


def robot_diagnostics(**values):
    return wire.new(DIAGNOSTIC_ARRAY, header=wire.header(1), status=[_status(0, "cdcca edge", "answering", "r1",
                                                                             values)])  # fmt: skip


def cloud_diagnostics():
    robot = _status(1, ROBOT_NAME + "r2", "gave up", "r2", {
        "applied_version": 1, "latest_version": 3, "pending_samples": 7, "rounds": 3, "rejections": 4,
        "last_reject_reason": "signature: key cloud-1 is not trusted"})  # fmt: skip
    worker = _status(0, WORKER_NAME, "serving", "_cloud", {"rounds_done": 5, "current_round": "r1 v3 (32 samples)",
                                                           "quarantined": 2, "pending_total": 39})  # fmt: skip
    return wire.new(DIAGNOSTIC_ARRAY, header=wire.header(1), status=[robot, worker])


def publish_all(link: Link, signer) -> None:
    put(link, "r1", "diagnostics", robot_diagnostics(adapter_version="2", uplink_queued="5", uplink_acked="40",
                                                     answers="100", updates_applied="2", updates_rejected="1",
                                                     cloud="up", something_new="ignored"))  # fmt: skip
    put(link, "_cloud", "diagnostics", cloud_diagnostics())
    put(link, "r2", "adapter_status", wire.new(wire.ADAPTER_STATUS, robot_id="r2", version=3, state=wire.REJECTED,
                                               reason="signature: key cloud-1 is not trusted"))  # fmt: skip
    put(link, "r2", "weight_delta", seal(b"\x00" * 16, robot_id="r2", version=3, base_version=0, keyframe=True,
                                         codec="fp16", num_params=4, signer=signer))  # fmt: skip


@contextlib.contextmanager
def publishing(link: Link, signer, period_s: float = 0.2):
    """Robots and the cloud publish every ``period_s`` on ``link`` while the block runs."""
    done = threading.Event()

    def publish_until_done():
        while not done.wait(period_s):
            publish_all(link, signer)

    thread = threading.Thread(target=publish_until_done, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


@pytest.fixture()
def endpoint(tmp_path):
    endpoint = private_endpoint(tmp_path)  # no other test's robot reaches it
    publisher = Link(LinkConfig(listen=[endpoint]))  # the robots and the cloud, as one session
    yield endpoint, publisher
    publisher.close()


def test_the_monitor_makes_one_row_per_robot_and_the_cloud_line(endpoint, keys):
    # Prepare
    address, publisher = endpoint
    link = Link(LinkConfig(connect=[address]))
    monitor = StatusMonitor(link)
    try:
        assert wait_until(lambda: link.peers() >= 1)
        # Execute: publish until everything has been seen (subscriptions take a moment to propagate)
        def complete():
            publish_all(publisher, keys[0])
            snap = monitor.snapshot()
            rows = {r["robot"]: r for r in snap["robots"]}
            return snap["cloud"] is not None and rows.get("r1", {}).get("answers") and rows.get("r2", {}).get("rounds")

        assert wait_until(complete, timeout=10)
        snapshot = monitor.snapshot()
    finally:
        monitor.close()
        link.close()
    # Assert
    rows = {row["robot"]: row for row in snapshot["robots"]}
    assert set(rows) == {"r1", "r2"}  # the cloud's pseudo id is no robot
    r1, r2 = rows["r1"], rows["r2"]
    assert (r1["adapter_version"], r1["uplink_queued"], r1["answers"], r1["uplink_acked"], r1["rejections"]) == \
        (2, 5, 100, 40, 1)  # fmt: skip
    assert r1["cloud"] == "up" and r1["seen_s_ago"] is not None
    assert r2["rounds"] == 3 and r2["rejections"] >= 4  # the cloud's count; the monitor's own is lower
    assert r2["last_reject_reason"] == "signature: key cloud-1 is not trusted"
    assert snapshot["cloud"]["rounds_done"] == 5 and snapshot["cloud"]["pending_total"] == 39
    text = plain_table(snapshot)
    assert "r1 v3 (32 samples)" in text and "signature: key cloud-1 is not trusted" in text
    assert all(len(line) <= 120 for line in text.splitlines())


def test_once_prints_one_json_snapshot_after_listening(endpoint, keys):
    # Prepare: robots and the cloud publish every 0.2 s while the command listens
    address, publisher = endpoint
    out = io.StringIO()
    # Execute
    with publishing(publisher, keys[0]):
        snapshot = run_status(LinkConfig(connect=[address]), once_after_s=2.5, json_out=True, out=out)
    # Assert
    printed = json.loads(out.getvalue())
    assert printed["robots"] == snapshot["robots"]
    assert [row["robot"] for row in printed["robots"]] == ["r1", "r2"]
    assert printed["robots"][0]["answers"] == 100 and printed["cloud"]["quarantined"] == 2


def test_once_with_nobody_on_the_link_says_so(endpoint):
    # Prepare
    address, _ = endpoint
    out = io.StringIO()
    # Execute
    snapshot = run_status(LinkConfig(connect=[address]), once_after_s=0.3, json_out=False, out=out)
    # Assert
    assert snapshot["robots"] == [] and snapshot["cloud"] is None
    assert "no robot heard from yet" in out.getvalue() and "cloud: not heard from" in out.getvalue()


def test_the_status_verb_exits_3_when_nothing_was_heard_so_a_health_check_can_use_it(endpoint, capsys):
    # Prepare: a link on which nobody publishes
    from cdcca.cli import main

    address, _ = endpoint
    # Execute
    code = main(["status", "--endpoint", address, "--once", "0.3"])
    # Assert: the table is printed as usual; the exit code and one warning say that nothing was heard
    captured = capsys.readouterr()
    assert code == 3
    assert "no robot heard from yet" in captured.out
    assert captured.err.strip() == ("cdcca status: warning: nothing heard in 0.3 s: no robot and no cloud on this "
                                    "link (robots report every 2 s: listen longer than that)")  # fmt: skip


def test_a_cloud_that_is_up_counts_as_heard_before_its_first_status(endpoint, capsys):
    # Prepare: a cloud worker whose presence token is up, and which has not published a status yet
    from cdcca.cli import main

    address, publisher = endpoint
    publisher.declare_presence("cloud/w0")
    # Execute
    code = main(["status", "--endpoint", address, "--once", "1"])
    # Assert: exit 0 (a health check with a window shorter than the status period does not flap), and the line says so
    captured = capsys.readouterr()
    assert (code, captured.err) == (0, "")
    assert "cloud: up (cloud/w0), no status heard yet" in captured.out


def test_the_status_verb_listens_once_and_prints_json(endpoint, keys, capsys, tmp_path):
    # Prepare: `cdcca status` joins the link through --endpoint, as a robot would
    from cdcca.cli import main

    address, publisher = endpoint
    # Execute
    with publishing(publisher, keys[0]):
        code = main(["status", "--endpoint", address, "--once", "2.5", "--as-json", "--json", str(tmp_path / "s.json")])
    # Assert: exit 0; the snapshot on stdout and in --json has the robots the link carried
    printed = capsys.readouterr().out
    snapshot = json.loads(printed[: printed.rindex("}") + 1])
    assert code == 0
    assert [row["robot"] for row in snapshot["robots"]] == ["r1", "r2"]
    assert json.loads((tmp_path / "s.json").read_text())["robots"] == snapshot["robots"]


def test_the_rich_view_renders_the_rows_within_120_columns():
    # Prepare
    from rich.console import Console

    from cdcca.status import rich_table

    snapshot = {"robots": [{"robot": "r1", "adapter_version": 3, "uplink_queued": 2, "answers": 41, "uplink_acked": 17,
                            "rounds": 3, "rejections": 1,
                            "last_reject_reason": "base fingerprint mismatch: " + "x" * 60,
                            "seen_s_ago": 1.2}],
                "cloud": None}  # fmt: skip
    console = Console(file=io.StringIO(), width=120, color_system=None)
    # Execute
    console.print(rich_table(snapshot))
    text = console.file.getvalue()
    # Assert
    assert "r1" in text and "41" in text and "base fingerprint mismatch" in text and "cloud: not heard from" in text
    assert max(len(line) for line in text.splitlines()) <= 120
