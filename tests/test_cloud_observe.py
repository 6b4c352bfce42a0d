"""What the cloud shows (issue 17, See what the robot and the cloud do): Prometheus metrics scraped over HTTP on
loopback, its DiagnosticArray on the link, and the base student's fingerprint in every delta it publishes."""

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from cdcca import wire
from cdcca.fingerprint import student_fingerprint
from cdcca.models.checkpoint import load_adaptable_student
from cdcca.status import StatusMonitor
from cdcca.transport import Link, LinkConfig
from cloud_trainer.prometheus import CloudMetrics
from cloud_trainer.status import ROBOT_NAME, WORKER_NAME, StatusPublisher, cloud_diagnostics
from tests.test_cloud_shutdown import private_endpoint
from tests.test_cloud_trainer import make_trainer
from tests.test_cloud_trainer import uploads as uploads  # noqa: F401  (the fixture)
from tests.test_transport import wait_until


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value of everything the endpoint serves."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def test_metrics_are_scraped_on_loopback(pretrained_test_pair, uploads, keys, tmp_path):
    # Prepare: one round, one duplicate, one rejected sample, and a robot that rejected the update
    trainer = make_trainer(pretrained_test_pair, keys[0], tmp_path / "cloud", round_size=4)
    trainer._send = lambda robot_id, robot, data: None
    metrics = CloudMetrics(trainer)
    port = metrics.serve(0)
    try:
        for msg in uploads[:4]:
            trainer.receive_tokens("r1", msg)
        trainer.receive_tokens("r1", uploads[0])
        broken = wire.decode(wire.UTS_TOKENS, wire.encode(uploads[6]))
        broken.token_indices = broken.token_indices[::-1].copy()
        trainer.receive_tokens("r1", broken)
        trainer.step()
        trainer.receive_tokens("r1", uploads[4])  # waits for the next round
        trainer.receive_status("r1", wire.new(wire.ADAPTER_STATUS, robot_id="r1", version=1, state=wire.REJECTED,
                                              reason="signature: key cloud-test is not trusted"))  # fmt: skip
        trainer.receive_status("r1", wire.new(wire.ADAPTER_STATUS, robot_id="r1", version=0, state=wire.APPLIED))
        # Execute
        found = scrape(port)
    finally:
        metrics.close()
        trainer.close()
    # Assert
    assert found[("cdcca_cloud_samples_received_total", ())] == 7
    assert found[("cdcca_cloud_samples_admitted_total", ())] == 5
    assert found[("cdcca_cloud_samples_duplicate_total", ())] == 1
    assert found[("cdcca_cloud_samples_rejected_total", (("reason", "inconsistent"),))] == 1
    assert found[("cdcca_cloud_rounds_total", (("outcome", "done"),))] == 1
    assert found[("cdcca_cloud_rounds_total", (("outcome", "abandoned"),))] == 0
    assert found[("cdcca_cloud_round_seconds_count", ())] == 1
    assert found[("cdcca_cloud_update_rejections_total", (("reason", "signature"),))] == 1
    assert found[("cdcca_cloud_robot_applied_version", (("robot", "r1"),))] == 0
    assert found[("cdcca_cloud_robot_latest_version", (("robot", "r1"),))] == 1
    assert found[("cdcca_cloud_pending_samples", (("robot", "r1"),))] == 1


def test_the_cloud_publishes_its_status_on_the_link(pretrained_test_pair, uploads, keys, tmp_path):
    # Prepare: a cloud on a real Zenoh link with one round done and one sample pending; a monitor listens
    endpoint = private_endpoint(tmp_path)
    cloud_link = Link(LinkConfig(listen=[endpoint]))
    monitor_link = Link(LinkConfig(connect=[endpoint]))
    trainer = make_trainer(pretrained_test_pair, keys[0], tmp_path / "cloud", round_size=4)
    trainer.link = cloud_link
    for msg in uploads[:4]:
        trainer.receive_tokens("r1", msg)
    trainer.step()
    trainer.receive_tokens("r1", uploads[4])  # waits for the next round
    monitor = StatusMonitor(monitor_link)
    publisher = StatusPublisher(trainer, every_s=0.2).start()
    try:
        # Execute
        assert wait_until(lambda: monitor.snapshot()["cloud"] is not None, timeout=10)
        snapshot = monitor.snapshot()
        array = cloud_diagnostics(trainer)
    finally:
        publisher.stop()
        monitor_link.close()
        trainer.close()
        cloud_link.close()
    # Assert: the message itself, and what a monitor makes of it
    names = [status.name for status in array.status]
    assert names == [ROBOT_NAME + "r1", WORKER_NAME]
    robot = {kv.key: kv.value for kv in array.status[0].values}
    assert {k: robot[k] for k in ("latest_version", "pending_samples", "rounds", "rejections")} == \
        {"latest_version": "1", "pending_samples": "1", "rounds": "1", "rejections": "0"}  # fmt: skip
    assert {"applied_version", "last_reject_reason"} <= set(robot)
    worker = {kv.key: kv.value for kv in array.status[1].values}
    assert (worker["rounds_done"], worker["current_round"], worker["pending_total"]) == ("1", "", "1")
    assert "quarantined" in worker
    assert snapshot["cloud"]["rounds_done"] == 1 and snapshot["cloud"]["pending_total"] == 1
    assert [row["robot"] for row in snapshot["robots"]] == ["r1"] and snapshot["robots"][0]["rounds"] == 1
    assert publisher.published >= 1


def test_every_delta_carries_the_base_students_fingerprint(pretrained_test_pair, uploads, keys, tmp_path):
    # Prepare
    trainer = make_trainer(pretrained_test_pair, keys[0], tmp_path / "cloud", round_size=4)
    sent = []
    trainer._send = lambda robot_id, robot, data: sent.append(wire.decode(wire.WEIGHT_DELTA, data))
    for msg in uploads[:4]:
        trainer.receive_tokens("r1", msg)
    # Execute: a round's delta, then a keyframe resend to a robot that reports the base
    trainer.step()
    trainer.receive_status("r1", wire.new(wire.ADAPTER_STATUS, robot_id="r1", version=0, state=wire.APPLIED))
    assert trainer.resend_if_behind("r1")
    # Assert
    expected = student_fingerprint(load_adaptable_student(pretrained_test_pair))
    assert len(expected) == 16
    assert [m.base_fingerprint for m in sent] == [expected, expected]
    stored = wire.decode(wire.WEIGHT_DELTA, trainer.store.load_robot("r1").deltas[1])
    assert stored.base_fingerprint == expected
