"""Bags: rosbag2 round trips in both storages, image encodings, bad messages, and RealSense recordings."""

import logging
import re

import numpy as np
import pytest
from rosbags.rosbag1 import Writer as Ros1Writer
from rosbags.typesys import Stores, get_typestore

from cdcca import bag, wire
from cdcca.data.digits_shift import load_domain

RGB_2X2 = np.array([[[1, 2, 3], [4, 5, 6]], [[7, 8, 9], [10, 11, 12]]], dtype=np.uint8)  # (2, 2, 3)
GREY_2X2 = np.array([[[10] * 3, [20] * 3], [[30] * 3, [40] * 3]], dtype=np.uint8)  # (2, 2, 3), R = G = B

# (encoding, step, raw bytes as a sensor_msgs/Image carries them, expected RGB)
DECODE_CASES = [
    ("rgb8", 6, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], RGB_2X2),
    ("bgr8", 6, [3, 2, 1, 6, 5, 4, 9, 8, 7, 12, 11, 10], RGB_2X2),
    ("rgba8", 8, [1, 2, 3, 255, 4, 5, 6, 0, 7, 8, 9, 9, 10, 11, 12, 1], RGB_2X2),
    ("bgra8", 8, [3, 2, 1, 255, 6, 5, 4, 0, 9, 8, 7, 9, 12, 11, 10, 1], RGB_2X2),
    ("mono8", 2, [10, 20, 30, 40], GREY_2X2),
    ("rgb8", 8, [1, 2, 3, 4, 5, 6, 99, 99, 7, 8, 9, 10, 11, 12, 99, 99], RGB_2X2),  # rows padded to 8 bytes
    ("mono8", 4, [10, 20, 0, 0, 30, 40, 0, 0], GREY_2X2),  # rows padded to 4 bytes
]


def _cdr_round_trip(msg):
    return wire.decode(msg.__msgtype__, wire.encode(msg))


def _depth_image():
    """A 1x1 float depth image, an encoding CD-CCA does not turn into RGB (16UC1 it shows as grey)."""
    return wire.new(wire.IMAGE, height=1, width=1, encoding="32FC1", step=4, data=np.zeros(4, np.uint8))


@pytest.fixture(scope="session")
def stream_samples():
    """2 domains x 3 images x 3 tasks of the digits-shift stream split."""
    return load_domain("colour_inverted", "stream", limit=3) + load_domain("printed", "stream", limit=3)


@pytest.mark.parametrize("storage, storage_file", [("mcap", "stream.mcap"), ("sqlite3", "stream.db3")])
def test_stream_bag_round_trips_to_the_same_samples(tmp_path, stream_samples, storage, storage_file):
    # Prepare
    path = tmp_path / "stream"

    # Execute
    summary = bag.make_stream_bag(path, domains=("colour_inverted", "printed"), limit=3, storage=storage)
    stats = bag.ReadStats()
    samples = bag.read_samples(path, stats)
    stamps = [event.stamp_ns for event in bag.read_bag(path)]

    # Assert
    assert (path / storage_file).is_file() and (path / "metadata.yaml").is_file()
    assert summary.counts == {bag.CAMERA_TOPIC: 6, bag.PROMPT_TOPIC: 18, bag.GROUND_TRUTH_TOPIC: 18}
    assert summary.messages == 42
    assert stats.events == summary.counts and not stats.skipped and not stats.ignored and stats.unpaired == 0
    assert len(stamps) == 42 and all(a < b for a, b in zip(stamps, stamps[1:]))
    assert stamps[0] == bag.DEFAULT_START_NS
    assert len(samples) == len(stream_samples) == 18
    for got, want in zip(samples, stream_samples):
        assert (got.sample_id, got.domain, got.task) == (want.sample_id, want.domain, want.task)
        assert got.prompt == want.prompt
        assert (got.answers, got.choices, got.correct_idx) == (want.answers, want.choices, want.correct_idx)
        assert (got.references, got.target) == (want.references, want.target)
        np.testing.assert_array_equal(got.image, want.image)
    assert samples[0].image is samples[2].image  # the three prompts about one frame share its array


def test_stream_bag_frames_are_rgb8_images_in_the_camera_frame(tmp_path, stream_samples):
    # Prepare
    path = tmp_path / "stream"
    bag.write_stream_bag(path, stream_samples[:3], frame_period_ns=70, start_ns=1000)

    # Execute
    events = list(bag.read_bag(path))

    # Assert
    assert [type(event).__name__ for event in events] == ["Frame"] + ["Prompt", "GroundTruth"] * 3
    assert [event.stamp_ns for event in events] == [1000, 1010, 1020, 1030, 1040, 1050, 1060]
    assert events[0].frame_id == bag.CAMERA_FRAME_ID and events[0].rgb.shape == (24, 24, 3)
    assert events[2].record["sample_id"] == "colour_inverted/stream/0000/vqa"


@pytest.mark.parametrize("encoding, step, data, expected", DECODE_CASES)
def test_image_encodings_decode_to_exact_rgb(encoding, step, data, expected):
    # Prepare
    msg = wire.new(wire.IMAGE, height=2, width=2, encoding=encoding, step=step, data=np.array(data, dtype=np.uint8))

    # Execute
    rgb = bag.msg_to_rgb(_cdr_round_trip(msg))

    # Assert
    assert rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb, expected)


@pytest.mark.parametrize(
    "encoding, step, first_pixel_bytes",
    [("rgb8", 6, [1, 2, 3]), ("bgr8", 6, [3, 2, 1]), ("rgba8", 8, [1, 2, 3, 255]), ("bgra8", 8, [3, 2, 1, 255])],
)
def test_image_to_msg_writes_the_encoding_and_reads_back(encoding, step, first_pixel_bytes):
    # Execute
    msg = _cdr_round_trip(bag.image_to_msg(RGB_2X2, stamp_ns=5_000_000_123, frame_id="cam", encoding=encoding))

    # Assert
    assert (msg.encoding, msg.height, msg.width, msg.step) == (encoding, 2, 2, step)
    assert msg.data[: len(first_pixel_bytes)].tolist() == first_pixel_bytes
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec, msg.header.frame_id) == (5, 123, "cam")
    np.testing.assert_array_equal(bag.msg_to_rgb(msg), RGB_2X2)


def test_mono8_stores_luma_of_grey_pixels():
    msg = bag.image_to_msg(GREY_2X2, encoding="mono8")

    assert (msg.step, msg.data.tolist()) == (2, [10, 20, 30, 40])
    np.testing.assert_array_equal(bag.msg_to_rgb(msg), GREY_2X2)


def test_png_compressed_image_is_lossless():
    # Prepare
    rgb = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)

    # Execute
    msg = _cdr_round_trip(bag.compressed_to_msg(rgb, fmt="png", stamp_ns=42, frame_id="cam"))

    # Assert
    assert msg.format == "png" and bytes(msg.data[1:4]) == b"PNG"
    np.testing.assert_array_equal(bag.msg_to_rgb(msg), rgb)


@pytest.mark.parametrize("fmt_string", ["jpeg", "rgb8; jpeg compressed bgr8"])
def test_jpeg_compressed_image_is_close(fmt_string):
    # Prepare: a smooth gradient, which JPEG keeps within a few levels
    ramp = np.linspace(0, 255, 32, dtype=np.float32)
    rgb = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], 128.0), axis=-1).astype(np.uint8)  # (32, 32, 3)
    msg = bag.compressed_to_msg(rgb, fmt="jpeg", quality=95)
    msg = wire.new(wire.COMPRESSED_IMAGE, format=fmt_string, data=msg.data)  # as compressed_image_transport names it

    # Execute
    decoded = bag.msg_to_rgb(_cdr_round_trip(msg))

    # Assert
    assert bytes(msg.data[:2]) == b"\xff\xd8"  # JPEG start-of-image marker
    assert decoded.shape == (32, 32, 3)
    assert np.abs(decoded.astype(int) - rgb.astype(int)).mean() < 2.0
    assert np.abs(decoded.astype(int) - rgb.astype(int)).max() <= 16


@pytest.mark.parametrize(
    "make_msg, named",
    [
        (_depth_image, "32FC1"),
        (lambda: wire.new(wire.COMPRESSED_IMAGE, format="tiff", data=np.zeros(4, np.uint8)), "tiff"),
        (lambda: wire.new(wire.COMPRESSED_IMAGE, format="16UC1; compressedDepth png"), "compressedDepth"),
    ],
)
def test_unsupported_encodings_raise_an_error_naming_them(make_msg, named):
    with pytest.raises(bag.ImageEncodingError) as caught:
        bag.msg_to_rgb(make_msg())

    assert named in str(caught.value)
    assert "jpeg" in str(caught.value) and "png" in str(caught.value)
    if named == "32FC1":
        assert "rgb8, bgr8, rgba8, bgra8, mono8" in str(caught.value)


def test_writing_an_unsupported_encoding_is_refused():
    with pytest.raises(bag.ImageEncodingError, match=r"'16UC1'.*rgb8"):
        bag.image_to_msg(RGB_2X2, encoding="16UC1")
    with pytest.raises(bag.ImageEncodingError, match=r"\(H, W, 3\)"):
        bag.image_to_msg(RGB_2X2[..., 0])


def test_short_image_data_is_an_error():
    msg = wire.new(wire.IMAGE, height=2, width=2, encoding="rgb8", step=6, data=np.zeros(11, np.uint8))

    with pytest.raises(bag.ImageEncodingError, match="needs step >= 6 and 12 bytes, got step=6 and 11 bytes"):
        bag.msg_to_rgb(msg)


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_bad_messages_are_logged_counted_and_skipped(tmp_path, caplog, storage):
    # Prepare: good frame, prompt, then a truncated Image, a 32FC1 Image, non-JSON truth, and another good frame
    path = tmp_path / "bad"
    with bag.BagWriter(path, storage) as writer:
        writer.write(bag.CAMERA_TOPIC, bag.image_to_msg(RGB_2X2, 1), 1)
        writer.write(bag.PROMPT_TOPIC, wire.new(wire.STRING, data="what digit is this?"), 2)
        writer.write_cdr(bag.CAMERA_TOPIC, wire.IMAGE, 3, b"\x00\x01\x00\x00\x07\x00\x00")
        writer.write(bag.CAMERA_TOPIC, _depth_image(), 4)
        writer.write(bag.GROUND_TRUTH_TOPIC, wire.new(wire.STRING, data="{not json"), 5)
        writer.write(bag.CAMERA_TOPIC, bag.image_to_msg(GREY_2X2, 6), 6)
        writer.write("/cdcca/status", wire.new(wire.ADAPTER_STATUS), 7)
    stats = bag.ReadStats()

    # Execute
    with caplog.at_level(logging.WARNING, logger="cdcca.bag"):
        events = list(bag.read_bag(path, stats))

    # Assert
    assert [(type(event).__name__, event.stamp_ns) for event in events] == [
        ("Frame", 1), ("Prompt", 2), ("Frame", 6), ("CdccaMessage", 7)
    ]  # fmt: skip
    np.testing.assert_array_equal(events[2].rgb, GREY_2X2)
    assert events[3].msgtype == wire.ADAPTER_STATUS
    assert stats.skipped == {bag.CAMERA_TOPIC: 2, bag.GROUND_TRUTH_TOPIC: 1}
    assert stats.events == {bag.CAMERA_TOPIC: 2, bag.PROMPT_TOPIC: 1, "/cdcca/status": 1}
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 3
    assert "malformed sensor_msgs/msg/Image" in warnings[0] and "'32FC1'" in warnings[1]
    assert "not JSON" in warnings[2]


def test_unlabelled_prompts_become_vqa_samples_and_orphans_are_counted(tmp_path):
    # Prepare: a prompt before any frame (orphan), a frame, then two prompts without ground truth
    path = tmp_path / "robot"
    with bag.BagWriter(path) as writer:
        writer.write(bag.PROMPT_TOPIC, wire.new(wire.STRING, data="too early"), 1)
        writer.write(bag.CAMERA_TOPIC, bag.image_to_msg(RGB_2X2), 2)
        writer.write(bag.PROMPT_TOPIC, wire.new(wire.STRING, data="what is this?"), 3)
        writer.write(bag.PROMPT_TOPIC, wire.new(wire.STRING, data="describe it."), 4)
    stats = bag.ReadStats()

    # Execute
    samples = bag.read_samples(path, stats)

    # Assert
    assert [(s.sample_id, s.prompt, s.domain, s.task, s.answers) for s in samples] == [
        ("robot@3", "what is this?", "unlabelled", "vqa", []),
        ("robot@4", "describe it.", "unlabelled", "vqa", []),
    ]
    np.testing.assert_array_equal(samples[1].image, RGB_2X2)
    assert stats.unpaired == 1


def test_writer_refuses_an_existing_path_or_unknown_storage(tmp_path):
    with pytest.raises(bag.BagError, match="exists already"):
        bag.BagWriter(tmp_path)
    with pytest.raises(bag.BagError, match=r"storage must be one of \['mcap', 'sqlite3'\], got 'rosbag1'"):
        bag.BagWriter(tmp_path / "new", storage="rosbag1")
    with pytest.raises(bag.BagError, match="does not exist"):
        list(bag.read_bag(tmp_path / "missing"))


def test_legacy_realsense_ros1_bag_is_read(tmp_path):
    # Prepare: the layout of RealSense SDK < 2.59 recordings: ROS 1 .bag, raw Image on /device_0/sensor_1/...
    store = get_typestore(Stores.ROS1_NOETIC)
    path = tmp_path / "legacy.bag"
    header = store.types["std_msgs/msg/Header"](
        seq=0, stamp=store.types["builtin_interfaces/msg/Time"](sec=1, nanosec=5), frame_id="Color"
    )
    image = store.types["sensor_msgs/msg/Image"](
        header=header, height=2, width=2, encoding="bgr8", is_bigendian=0, step=6,
        data=np.array(DECODE_CASES[1][2], dtype=np.uint8),
    )  # fmt: skip
    with Ros1Writer(path) as writer:
        connection = writer.add_connection("/device_0/sensor_1/Color_0/image/data", image.__msgtype__, typestore=store)
        writer.write(connection, 1_000_000_005, store.serialize_ros1(image, image.__msgtype__))

    # Execute
    events = list(bag.read_bag(path))

    # Assert
    assert len(events) == 1 and isinstance(events[0], bag.Frame)
    assert (events[0].topic, events[0].stamp_ns, events[0].frame_id) == (
        "/device_0/sensor_1/Color_0/image/data", 1_000_000_005, "Color"
    )  # fmt: skip
    np.testing.assert_array_equal(events[0].rgb, RGB_2X2)


def _record_software_camera(rs, path, frames):
    """Record ``frames`` (H, W, 3) rgb8 through a librealsense software device with ``rs.recorder``."""
    height, width = frames[0].shape[:2]
    device = rs.software_device()
    sensor = device.add_sensor("Color")
    intrinsics = rs.intrinsics()
    intrinsics.width, intrinsics.height, intrinsics.ppx, intrinsics.ppy = width, height, width / 2, height / 2
    intrinsics.fx = intrinsics.fy = 5.0
    intrinsics.model = rs.distortion.none
    stream = rs.video_stream()
    stream.type, stream.index, stream.uid, stream.fmt = rs.stream.color, 0, 0, rs.format.rgb8
    stream.width, stream.height, stream.fps, stream.bpp, stream.intrinsics = width, height, 30, 3, intrinsics
    profile = sensor.add_video_stream(stream)
    recorder = rs.recorder(str(path), device)
    queue = rs.frame_queue(len(frames))
    sensor.open(profile)
    sensor.start(queue)
    for number, rgb in enumerate(frames):
        frame = rs.software_video_frame()
        frame.pixels, frame.bpp, frame.stride = rgb, 3, width * 3
        frame.timestamp, frame.frame_number = (number + 1) * 33.3, number
        frame.domain, frame.profile = rs.timestamp_domain.hardware_clock, profile.as_video_stream_profile()
        sensor.on_video_frame(frame)
        queue.wait_for_frame(1000)
    sensor.stop()
    sensor.close()
    del recorder  # the recording is finalised when the recorder goes away


def test_realsense_sdk_recording_is_read(tmp_path):
    # Prepare
    try:
        import pyrealsense2 as rs
    except ImportError as err:
        pytest.skip(f"pyrealsense2 cannot be imported ({err}); pip install pyrealsense2 (needs libusb-1.0-0)")
    frames = [(np.arange(36, dtype=np.uint8).reshape(3, 4, 3) * 7 + 10 * n).astype(np.uint8) for n in range(3)]
    try:  # SDK 2.59 records rosbag2 .db3 and refuses .bag; older SDKs record ROS 1 .bag
        path = tmp_path / "realsense.db3"
        _record_software_camera(rs, path, frames)
    except RuntimeError as err:
        if ".db3" not in str(err):
            raise
        path = tmp_path / "realsense.bag"
        _record_software_camera(rs, path, frames)
    stats = bag.ReadStats()

    # Execute
    events = list(bag.read_bag(path, stats))

    # Assert
    assert [type(event).__name__ for event in events] == ["Frame"] * 3
    assert all(re.fullmatch(r"/device_0/sensor_\d+/Color_0/image/data(/compressed)?", e.topic) for e in events)
    assert all(event.frame_id == "Color" for event in events)
    for event, rgb in zip(events, frames):
        np.testing.assert_array_equal(event.rgb, rgb)  # png or raw: lossless either way
    assert not stats.skipped
    assert sum(count for topic, count in stats.ignored.items() if topic.endswith("/image/metadata")) == 3


def test_a_bag_that_breaks_while_it_is_read_is_a_bag_error(tmp_path):
    """Damage past the index (a record longer than the file, a copy cut short) shows only while messages are read;
    rosbags and apsw raise their own types then, which must reach the caller as BagError (the CLI's clear line)."""
    import struct

    stamp = 1_700_000_000 * 10**9
    with bag.BagWriter(tmp_path / "good", "mcap") as writer:
        for i in range(3):
            writer.write(bag.CAMERA_TOPIC, bag.image_to_msg(RGB_2X2, stamp + 10 * i, "cam"), stamp + 10 * i)
    raw = bytearray(next((tmp_path / "good").glob("*.mcap")).read_bytes())
    # the first Message record: opcode 0x05, its u64 length, channel u16, sequence u32, then log_time = stamp
    at = next(m.start() - 15 for m in re.finditer(re.escape(struct.pack("<Q", stamp)), bytes(raw))
              if raw[m.start() - 15] == 0x05)  # fmt: skip
    for length in (1 << 20, 1 << 62):
        raw[at + 1 : at + 9] = struct.pack("<Q", length)
        broken = tmp_path / f"long{length}.mcap"
        broken.write_bytes(raw)
        with pytest.raises(bag.BagError, match="is corrupt where it was being read"):
            list(bag.read_bag(broken))
        with pytest.raises(bag.BagError, match="is corrupt where it was being read"):
            bag.choose_camera_topic(broken)


def test_a_compressed_image_claiming_a_huge_canvas_is_refused_before_it_is_decoded():
    """A 1-bit PNG of 9400x9400 is 10 kB and would inflate to about 1 GB of RGB."""
    import io

    from PIL import Image as PILImage

    from cdcca.wire.images import MAX_COMPRESSED_PIXELS, ImageEncodingError, msg_to_rgb

    buffer = io.BytesIO()
    PILImage.new("1", (9400, 9400)).save(buffer, format="PNG")
    assert len(buffer.getvalue()) < 64_000 and 9400 * 9400 > MAX_COMPRESSED_PIXELS
    msg = wire.new(wire.COMPRESSED_IMAGE, format="png", data=np.frombuffer(buffer.getvalue(), np.uint8))
    with pytest.raises(ImageEncodingError, match="9400x9400 is larger than any camera's frame"):
        msg_to_rgb(msg)
    buffer = io.BytesIO()
    PILImage.new("RGB", (3840, 2160), (1, 2, 3)).save(buffer, format="PNG")  # a 4K frame still decodes
    frame = msg_to_rgb(wire.new(wire.COMPRESSED_IMAGE, format="png", data=np.frombuffer(buffer.getvalue(), np.uint8)))
    assert frame.shape == (2160, 3840, 3) and tuple(frame[0, 0]) == (1, 2, 3)
