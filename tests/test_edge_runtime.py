"""The edge runtime: answers + UTS + durable uplink, and the whole loop with a cloud trainer over loopback Zenoh."""

import threading
import time

import numpy as np
import pytest

from cdcca import wire
from cdcca.akd import AKDConfig
from cdcca.data.digits_shift import load_domain
from cdcca.edge.app import build_runtime
from cdcca.edge.runtime import EdgeConfig
from cdcca.edge.sources import SourceError, open_source
from cdcca.envelope import Signer, generate_key, trust_key
from cdcca.models.checkpoint import load_adaptable_student, load_mllm
from cdcca.transport import Link, LinkConfig
from cdcca.uts import UTSConfig, frame_prompts
from cloud_trainer.service import CloudConfig, CloudTrainer
from tests.test_transport import free_port, wait_until

ALL_SAMPLES = UTSConfig(sample_mode="threshold", entropy_threshold=-1.0)  # every answer is "uncertain"


@pytest.fixture()
def keys(tmp_path):
    private, public = generate_key(tmp_path / "keys", "cloud-test")
    trust_key(public, tmp_path / "trust")
    return Signer.load(private), tmp_path / "trust"


@pytest.fixture(scope="module")
def stream():
    samples = load_domain("printed", "stream", limit=6)
    return [s.load_image() for s in samples], [s.prompt for s in samples], [s.sample_id for s in samples]


def test_offline_robot_answers_and_queues_within_its_bound(pretrained_test_pair, keys, tmp_path, stream):
    images, prompts, ids = stream
    config = EdgeConfig(state_dir=tmp_path / "edge", queue_capacity=5, uts=ALL_SAMPLES)
    runtime = build_runtime(pretrained_test_pair, config, keys[1], link=None)
    answers = runtime.ask(images, prompts, ids)
    assert [a.sample_id for a in answers] == ids and all(a.adapter_version == 0 for a in answers)
    assert all(np.isfinite(a.entropy) for a in answers)
    stats = runtime.stats()
    # one upload per frame (6 frames, three prompts each): the queue keeps 5 and drops the least uncertain one
    assert (stats["answers"], stats["selected"], stats["uplink_queued"], stats["uplink_dropped"]) == (18, 18, 5, 1)
    for _, payload in runtime.uplink.due(0.0):
        carried = [p.sample_id for p in frame_prompts(wire.decode(wire.UTS_TOKENS, payload))]
        assert len(carried) == 3 and len({i.rsplit("/", 1)[0] for i in carried}) == 1
    kept = runtime.uplink.ids()
    runtime.close()
    restarted = build_runtime(pretrained_test_pair, config, keys[1], link=None)  # the queue is durable
    assert restarted.uplink.ids() == kept
    queued = wire.decode(wire.UTS_TOKENS, restarted.uplink.due(0.0)[0][1])
    assert queued.robot_id == "r1" and 0 < len(queued.token_indices) < queued.num_tokens
    restarted.close()


def test_frames_of_a_4d_batch_are_never_merged(pretrained_test_pair, keys, tmp_path, stream):
    images, prompts, _ = stream
    runtime = build_runtime(pretrained_test_pair, EdgeConfig(state_dir=tmp_path / "edge", uts=ALL_SAMPLES), keys[1])
    batch = np.stack([images[0], images[3], images[0], images[3]])  # iterating it yields short-lived views
    runtime.ask(batch, prompts[:4])
    assert runtime.stats()["uplink_queued"] == 4  # each view is its own frame: nothing merged by a reused id()
    runtime.ask([images[0], images[3], images[0], images[3]], prompts[:4])  # the same arrays: two frames
    assert runtime.stats()["uplink_queued"] == 6
    runtime.close()


def test_a_model_failure_is_counted_and_the_robot_keeps_serving(pretrained_test_pair, keys, tmp_path, stream):
    images, prompts, ids = stream
    runtime = build_runtime(pretrained_test_pair, EdgeConfig(state_dir=tmp_path / "edge"), keys[1])
    answers = runtime.ask([np.zeros((2, 2), np.uint8)] * 2, prompts[:2])  # not an RGB frame
    assert [a.answer for a in answers] == ["", ""] and runtime.counters.failed_answers == 2
    assert len(runtime.ask(images[:2], prompts[:2])) == 2 and runtime.counters.answers == 2
    runtime.close()


def test_sources(tmp_path, stream):
    from PIL import Image

    for i, image in enumerate(stream[0][:2]):
        Image.fromarray(image).save(tmp_path / f"frame{i}.png")
    queries = list(open_source(f"dir:{tmp_path}", prompts=("what digit?", "what colour?")))
    assert [q.sample_id for q in queries] == ["frame0.png#0", "frame0.png#1", "frame1.png#0", "frame1.png#1"]
    assert np.array_equal(queries[2].image, stream[0][1]) and queries[1].prompt == "what colour?"
    for spec in ("bag:/nonexistent", "dir:", "camera:0", f"realsense:{tmp_path / 'none.db3'}"):
        with pytest.raises(SourceError):
            open_source(spec)


def test_the_loop_over_loopback_zenoh(pretrained_test_pair, keys, tmp_path, stream):
    """Robot and cloud in one process but on two Zenoh sessions: upload, ack, round, delta, swap, status."""
    signer, trust = keys
    images, prompts, ids = stream
    endpoint = f"tcp/127.0.0.1:{free_port()}"
    cloud_link, robot_link = Link(LinkConfig.loopback(True, endpoint)), Link(LinkConfig.loopback(False, endpoint))
    config = CloudConfig(state_dir=tmp_path / "cloud", round_size=6, codec="nf4-zstd",
                         akd=AKDConfig(steps=3, batch_size=4))  # fmt: skip
    checkpoints = pretrained_test_pair
    trainer = CloudTrainer(load_mllm(checkpoints / "teacher"), lambda: load_adaptable_student(checkpoints), signer,
                           config, cloud_link)  # fmt: skip
    runtime = build_runtime(pretrained_test_pair, EdgeConfig(state_dir=tmp_path / "edge", heartbeat_every_s=0.2,
                                                             uts=ALL_SAMPLES), trust, robot_link)  # fmt: skip
    stop = threading.Event()
    server = threading.Thread(target=trainer.serve, args=(stop,), daemon=True)
    try:
        assert wait_until(lambda: robot_link.peers() >= 1)
        time.sleep(0.3)
        server.start()
        runtime.start()
        runtime.ask(images, prompts, ids)
        assert wait_until(lambda: runtime.backend.version == 1, timeout=60)
        assert wait_until(lambda: len(runtime.uplink) == 0)  # every upload acknowledged ...
        assert trainer.store.sample_ids("r1") == set(ids[::3])  # ... because the cloud stored it (one per frame)
        assert wait_until(lambda: trainer.robots["r1"].reported == 1)  # the heartbeat told the cloud
        assert runtime.ask(images[:1], prompts[:1])[0].adapter_version == 1
        assert runtime.stats()["uplink_acked"] == 6 and trainer.counters.deltas_sent == 1
    finally:
        stop.set()
        server.join(timeout=30)
        runtime.close()
        trainer.close()
        robot_link.close()
        cloud_link.close()


def test_onnx_backend_runtime_answers_like_torch(pretrained_test_pair, keys, tmp_path, stream):
    from cdcca.edge.onnx_export import OnnxModelMismatch, export_onnx

    images, prompts, ids = stream
    with pytest.raises(OnnxModelMismatch, match="cdcca export"):
        build_runtime(pretrained_test_pair, EdgeConfig(state_dir=tmp_path / "missing"), keys[1], backend="onnx")
    export_onnx(load_adaptable_student(pretrained_test_pair), pretrained_test_pair / "student_onnx")
    try:
        results = {}
        for backend in ("torch", "onnx"):
            runtime = build_runtime(pretrained_test_pair, EdgeConfig(state_dir=tmp_path / backend, uts=ALL_SAMPLES),
                                    keys[1], backend=backend)  # fmt: skip
            results[backend] = [a.answer for a in runtime.ask(images, prompts, ids)]
            assert runtime.stats()["uplink_queued"] == len(ids) // 3  # UTS runs on both: one upload per frame
            # the ONNX robot scores with its own graphs and holds no torch student
            assert runtime.sampler_on_backend == (runtime.encoder_owner is None) == (backend == "onnx")
            runtime.close()
        assert results["onnx"] == results["torch"]
    finally:
        import shutil

        shutil.rmtree(pretrained_test_pair / "student_onnx")


def test_realsense_recording_source_asks_every_prompt_about_every_frame(tmp_path):
    from cdcca.bag import BagWriter, image_to_msg

    frames = [np.full((4, 6, 3), i * 40, np.uint8) for i in range(3)]
    depth = wire.new(wire.IMAGE, height=4, width=6, encoding="mono16", step=12, data=np.full(48, 7, np.uint8))
    with BagWriter(tmp_path / "rec", "sqlite3") as bag:  # as the RealSense SDK records: depth (sensor 0), colour
        for i, rgb in enumerate(frames):
            bag.write("/device_0/sensor_0/Depth_0/image/data", depth, 10 + i)  # mono16: would read as grey
            bag.write("/device_0/sensor_1/Color_0/image/data", image_to_msg(rgb, 10 + i), 10 + i)
    recording = next((tmp_path / "rec").glob("*.db3"))
    queries = list(open_source(f"realsense:{recording}", prompts=("a?", "b?")))
    assert [q.prompt for q in queries] == ["a?", "b?"] * 3
    assert all(np.array_equal(q.image, frames[i // 2]) for i, q in enumerate(queries))
