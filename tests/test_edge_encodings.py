"""Camera encodings of ordinary recordings (issue 17, §1): bags written as ``ros2 bag record`` writes them -- the
rosbags writer with the Jazzy typestore, ``sensor_msgs/msg/Image`` on the RealSense colour topic, no CD-CCA topic
-- in every encoding CD-CCA converts, and one line for the rest before anything is replayed."""

import json

import numpy as np
import pytest
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from cdcca.bag import BagError, Frame, ReadStats, choose_camera_topic, read_bag
from cdcca.edge.sources import open_source
from cdcca.wire.images import ImageEncodingError, msg_to_rgb
from cdcca.wire.topics import CAMERA_TOPIC

JAZZY = get_typestore(Stores.ROS2_JAZZY)  # what ros2 bag record stores: the robot's own message definitions
START_NS = 1_700_000_000 * 10**9
PERIOD_NS = 100_000_000
# (H, W, 3): pairs of equal columns, so 4:2:2 chroma subsampling loses nothing
RGB = np.repeat(np.array([[[200, 30, 40], [20, 180, 60]], [[10, 40, 220], [128, 128, 128]]], np.uint8), 2, axis=1)


def _yuv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ITU-R BT.601 video range, the inverse of what a UVC camera's YUYV means."""
    r, g, b = (rgb[..., k].astype(np.float64) for k in range(3))
    y = 16 + 0.257 * r + 0.504 * g + 0.098 * b
    u = 128 - 0.148 * r - 0.291 * g + 0.439 * b
    v = 128 + 0.439 * r - 0.368 * g - 0.071 * b
    return tuple(np.clip(np.rint(c), 0, 255).astype(np.uint8) for c in (y, u, v))


def _packed_422(rgb: np.ndarray, order: str) -> np.ndarray:
    y, u, v = _yuv(rgb)
    height, width = y.shape
    out = np.empty((height, width // 2, 4), np.uint8)  # one macropixel: two pixels, one U and one V
    planes = {"Y0": y[:, 0::2], "Y1": y[:, 1::2], "U": u[:, 0::2], "V": v[:, 0::2]}
    for k, name in enumerate(order.split()):
        out[..., k] = planes[name]
    return out.reshape(height, width * 2)


def _grey(rgb: np.ndarray) -> np.ndarray:
    return rgb.mean(axis=2).round().astype(np.uint8)  # (H, W)


DEPTH_MM = np.array([[0, 500], [1000, 2000]], np.uint16).repeat(2, axis=1)  # (H, W) millimetres


# encoding -> (bytes per row of RGB, is_bigendian, expected RGB, max abs error)
def _case(encoding: str):
    height, width = RGB.shape[:2]
    if encoding == "rgb8":
        return RGB.reshape(height, -1), 0, RGB, 0
    if encoding == "bgr8":
        return RGB[..., ::-1].reshape(height, -1), 0, RGB, 0
    if encoding == "rgba8":
        return np.dstack([RGB, np.full((height, width), 9, np.uint8)]).reshape(height, -1), 0, RGB, 0
    if encoding == "bgra8":
        return np.dstack([RGB[..., ::-1], np.full((height, width), 9, np.uint8)]).reshape(height, -1), 0, RGB, 0
    if encoding in ("yuv422_yuy2", "yuyv"):
        return _packed_422(RGB, "Y0 U Y1 V"), 0, RGB, 3
    if encoding in ("yuv422", "uyvy"):
        return _packed_422(RGB, "U Y0 V Y1"), 0, RGB, 3
    grey = _grey(RGB)
    if encoding == "mono16":  # full 16-bit intensity, both byte orders
        return (grey.astype(">u2") * 257).view(np.uint8).reshape(height, -1), 1, np.dstack([grey] * 3), 0
    if encoding == "16UC1":  # depth in mm, stretched 0..max as cv_bridge shows it
        grey = np.array([[0, 64], [128, 255]], np.uint8).repeat(2, axis=1)
        return DEPTH_MM.astype("<u2").view(np.uint8).reshape(height, -1), 0, np.dstack([grey] * 3), 1
    raise AssertionError(encoding)


ENCODINGS = ("rgb8", "bgr8", "rgba8", "bgra8", "yuv422_yuy2", "yuyv", "yuv422", "uyvy", "mono16", "16UC1")


def _image(encoding: str, stamp_ns: int, rows: np.ndarray, big_endian: int, padding: int = 0):
    """A ``sensor_msgs/msg/Image`` of the Jazzy typestore, rows padded by ``padding`` bytes as drivers may."""
    height = rows.shape[0]
    padded = np.hstack([rows, np.zeros((height, padding), np.uint8)])
    stamp = JAZZY.types["builtin_interfaces/msg/Time"](sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9)
    header = JAZZY.types["std_msgs/msg/Header"](stamp=stamp, frame_id="camera_color_optical_frame")
    return JAZZY.types["sensor_msgs/msg/Image"](header=header, height=height, width=RGB.shape[1], encoding=encoding,
                                                 is_bigendian=big_endian, step=padded.shape[1],
                                                 data=padded.reshape(-1))  # fmt: skip


def record(path, encoding: str, frames: int = 3, storage=StoragePlugin.SQLITE3, raw: bytes | None = None,
           bad=(1,)):  # fmt: skip
    """A bag as ``ros2 bag record /camera/camera/color/image_raw`` leaves it (``raw``: the CDR of frames ``bad``)."""
    rows, big_endian, _, _ = _case(encoding) if encoding in ENCODINGS else (RGB.reshape(2, -1), 0, None, 0)
    with Writer(path, version=9, storage_plugin=storage) as writer:
        connection = writer.add_connection(CAMERA_TOPIC, "sensor_msgs/msg/Image", typestore=JAZZY)
        for index in range(frames):
            stamp = START_NS + index * PERIOD_NS
            data = JAZZY.serialize_cdr(_image(encoding, stamp, rows, big_endian, padding=index % 2 * 3),
                                       "sensor_msgs/msg/Image")  # fmt: skip
            writer.write(connection, stamp, raw if raw is not None and index in bad else bytes(data))
    return path


@pytest.mark.parametrize("storage", [StoragePlugin.MCAP, StoragePlugin.SQLITE3], ids=["mcap", "sqlite3"])
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_every_converted_encoding_replays_from_a_recorded_bag(tmp_path, encoding, storage):
    # Prepare: Jazzy's ros2 bag record writes MCAP by default; sqlite3 with -s sqlite3
    bag = record(tmp_path / "bag", encoding, storage=storage)
    _, _, expected, tolerance = _case(encoding)

    # Execute
    stats = ReadStats()
    frames = [e for e in read_bag(bag, stats) if isinstance(e, Frame)]
    queries = list(open_source(f"bag:{bag}", ("what is it?", "what colour?")))

    # Assert
    assert len(frames) == 3 and not stats.skipped
    for frame in frames:
        assert frame.rgb.shape == expected.shape and frame.rgb.dtype == np.uint8
        assert np.abs(frame.rgb.astype(int) - expected).max() <= tolerance, encoding
    assert len(queries) == 3 * 2 and {q.prompt for q in queries} == {"what is it?", "what colour?"}
    assert [q.stamp_ns for q in queries[::2]] == [START_NS + k * PERIOD_NS for k in range(3)]


def test_mono16_honours_the_byte_order():
    rows, _, expected, _ = _case("mono16")  # big-endian bytes
    grey = expected[..., 0]
    little = (grey.astype("<u2") * 257).view(np.uint8).reshape(rows.shape)
    for data, big in ((rows, 1), (little, 0)):
        assert np.array_equal(msg_to_rgb(_image("mono16", 0, data, big)), expected)


@pytest.mark.parametrize("encoding", ["32FC1", "bayer_rggb8", "nv21"])
def test_other_encodings_are_one_line_before_replay(tmp_path, encoding):
    bag = record(tmp_path / "bag", encoding)

    with pytest.raises(BagError) as caught:
        open_source(f"bag:{bag}", ("q",))

    message = str(caught.value)
    assert "\n" not in message and encoding in message and CAMERA_TOPIC in message and "yuv422" in message


def test_odd_width_yuv422_is_refused_not_misread():
    rows = np.zeros((2, 6), np.uint8)  # 3 pixels of 2 bytes
    msg = _image("yuv422_yuy2", 0, rows, 0)
    msg.width = 3
    with pytest.raises(ImageEncodingError, match="even width"):
        msg_to_rgb(msg)


def test_frames_that_fail_to_decode_are_skipped_counted_and_logged_sparingly(tmp_path, caplog):
    # Prepare: frames 1..5 are cut short (a recorder killed mid-write, a bad disk)
    good = bytes(JAZZY.serialize_cdr(_image("rgb8", START_NS, *_case("rgb8")[:2]), "sensor_msgs/msg/Image"))
    bag = record(tmp_path / "bag", "rgb8", frames=7, raw=good[:40], bad=range(1, 6))
    assert choose_camera_topic(bag).topic == CAMERA_TOPIC  # the first frame is fine

    # Execute
    stats = ReadStats()
    frames = [e for e in read_bag(bag, stats) if isinstance(e, Frame)]

    # Assert
    assert len(frames) == 2 and stats.skipped[CAMERA_TOPIC] == 5
    logged = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(logged) == 3 and "(4 skipped on this topic so far)" in logged[-1]  # the 1st, 2nd and 4th


def _free_endpoint() -> str:
    import socket

    with socket.socket() as probe:  # a port no cloud listens on: the robot runs offline
        probe.bind(("127.0.0.1", 0))
        return f"tcp/127.0.0.1:{probe.getsockname()[1]}"


def test_edge_replays_a_yuyv_recording_and_reports_its_answers(pretrained_test_pair, tmp_path):
    """End to end: ``cdcca edge --source bag:`` on a YUYV USB-camera recording answers every prompt."""
    from cdcca.cli import main
    from cdcca.envelope import generate_key, trust_key

    _, public = generate_key(tmp_path / "keys", "cloud-1")
    trust_key(public, tmp_path / "trust")
    bag = record(tmp_path / "usb_cam", "yuv422_yuy2", storage=StoragePlugin.MCAP)
    report = tmp_path / "report.json"

    code = main(["edge", "--checkpoints", str(pretrained_test_pair), "--source", f"bag:{bag}", "--prompt", "what?",
                 "--state", str(tmp_path / "state"), "--trust", str(tmp_path / "trust"), "--rate", "0",
                 "--endpoint", _free_endpoint(), "--linger", "0", "--json", str(report)])  # fmt: skip

    result = json.loads(report.read_text())
    assert code in (0, 3)  # 3: no cloud was reached (this test runs offline)
    assert (result["queries"], result["answers"]) == (3, 3)
