"""Where the robot's frames and prompts come from: ``bag:PATH``, ``dir:PATH``, ``realsense`` or ``realsense:FILE``.

Each source yields :class:`Query` items (a frame, a prompt and a stable id). A bag with its own prompts
(``/cdcca/prompt``; see :mod:`cdcca.bag`) is replayed with them; any other bag (``ros2 bag record`` of a
camera), image folders and cameras are asked the ``prompts`` given about every frame. ``bag:PATH#TOPIC``
picks the camera topic of a bag (default: the first one it can read). A
RealSense recording (``.db3`` of SDK 2.59+, or a ROS 1 ``.bag`` of older SDKs) is read with :mod:`cdcca.bag`;
a live camera goes through ``pyrealsense2`` (colour stream, RGB8).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cdcca.errors import CdccaError

log = logging.getLogger(__name__)
FaultHandler = Callable[[str, str], None]  # (kind, one-line detail): e.g. EdgeRuntime.record_fault
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm")
DEFAULT_PROMPTS = ("what is in the picture?",)


class SourceError(CdccaError, ValueError):
    """A source specification that cannot be opened."""


@dataclass
class Query:
    """One prompt about one frame."""

    sample_id: str
    image: np.ndarray
    prompt: str
    stamp_ns: int | None = None  # receive time in a recording (replay pacing); None for live or folder frames


def _log_fault(kind: str, detail: str) -> None:
    log.warning("%s (%s); skipped", detail, kind)


def _bag(path: Path, prompts: Sequence[str], topic: str | None, on_fault: FaultHandler | None) -> Iterator[Query]:
    from cdcca.bag import PROMPT_TOPIC, Frame, Prompt, choose_camera_topic, read_bag

    camera = choose_camera_topic(path, topic)  # raises BagError before replay for an unreadable camera
    frame: Frame | None = None

    def on_skip(topic_: str, msgtype: str, stamp_ns: int, err: Exception) -> None:
        on_fault("bag_message", f"bag {path.name}: cannot use the {msgtype} on {topic_} at {stamp_ns} ns: {err}")

    wanted = (camera.topic, PROMPT_TOPIC) if camera.has_prompts else (camera.topic,)
    for event in read_bag(path, topics=wanted, on_skip=None if on_fault is None else on_skip):
        if isinstance(event, Frame):
            frame = event
            if not camera.has_prompts:
                for k, prompt in enumerate(prompts):
                    yield Query(f"{path.name}@{event.stamp_ns}#{k}", event.rgb, prompt, event.stamp_ns)
        elif isinstance(event, Prompt) and frame is not None:  # the bag's own prompt, about the latest frame
            yield Query(f"{path.name}@{event.stamp_ns}", frame.rgb, event.text, event.stamp_ns)


def _folder(path: Path, prompts: Sequence[str], on_fault: FaultHandler | None) -> Iterator[Query]:
    """Images in name order; one that cannot be read (truncated, corrupt, not an image) is reported to ``on_fault``
    (default: logged) and skipped."""
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SourceError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    for file in files:
        try:
            with Image.open(file) as image:
                rgb = np.asarray(image.convert("RGB"))
        except Exception as err:  # Pillow: OSError, SyntaxError, ValueError, zlib.error, DecompressionBombError...
            (on_fault or _log_fault)("bad_image", f"cannot read image {file}: {err}")
            continue
        for k, prompt in enumerate(prompts):
            yield Query(f"{file.name}#{k}", rgb, prompt)


def _recording(path: Path, prompts: Sequence[str]) -> Iterator[Query]:
    """The frames of one camera topic of a RealSense recording (the colour stream, not its depth beside it)."""
    from cdcca.bag import Frame, choose_camera_topic, read_bag

    for frame in read_bag(path, topics=[choose_camera_topic(path).topic]):
        if isinstance(frame, Frame):
            for k, prompt in enumerate(prompts):
                yield Query(f"{path.name}@{frame.stamp_ns}#{k}", frame.rgb, prompt)


def require_camera() -> None:
    """Fail at once when librealsense sees no camera: ``pipeline.start`` takes about 15 s to say so (0.1 s here)."""
    import pyrealsense2 as rs

    try:
        devices = len(rs.context().query_devices())
    except RuntimeError as err:  # librealsense's own errors (USB permissions, a busy device) are RuntimeErrors
        raise SourceError(f"cannot list RealSense cameras: {err}") from err
    if devices == 0:
        raise SourceError("no RealSense camera is connected (librealsense sees none: check the USB cable and the udev "
                          "rules); replay a recording with --source realsense:FILE instead")  # fmt: skip


def _camera(prompts: Sequence[str], width: int = 640, height: int = 480, fps: int = 30) -> Iterator[Query]:
    """Live RealSense colour frames (needs a connected camera; not testable without one)."""
    import pyrealsense2 as rs

    require_camera()
    pipeline, config = rs.pipeline(), rs.config()
    config.enable_stream(rs.stream.color, width, height, rs.format.rgb8, fps)
    try:
        pipeline.start(config)
    except RuntimeError as err:
        raise SourceError(f"cannot start the RealSense camera: {err}") from err
    try:
        while True:
            frame = pipeline.wait_for_frames().get_color_frame()
            if not frame:
                continue
            rgb = np.asanyarray(frame.get_data()).copy()
            stamp = time.time_ns()
            for k, prompt in enumerate(prompts):
                yield Query(f"realsense@{stamp}#{k}", rgb, prompt)
    finally:
        pipeline.stop()


def open_source(spec: str, prompts: Sequence[str] = DEFAULT_PROMPTS,
                on_fault: FaultHandler | None = None) -> Iterator[Query]:  # fmt: skip
    """The queries of ``bag:PATH[#TOPIC]``, ``dir:PATH``, ``realsense`` (live) or ``realsense:FILE`` (a recording).

    A bag is checked before the iterator is returned, so an unreadable camera topic raises here. Later faults (an
    image file that cannot be read, a bag message that does not decode) go to ``on_fault(kind, detail)`` (default:
    logged) and are skipped; the source goes on.
    """
    kind, _, rest = spec.partition(":")
    if kind == "realsense":
        if not rest:
            return _camera(prompts)
        path = Path(rest)
        if not path.exists():
            raise SourceError(f"no RealSense recording at {path}")
        return _recording(path, prompts)
    if kind not in ("bag", "dir") or not rest:
        raise SourceError(f"source {spec!r}: use bag:PATH[#TOPIC], dir:PATH, realsense or realsense:FILE")
    topic = None
    if kind == "bag" and "#" in rest:
        rest, _, topic = rest.partition("#")
    path = Path(rest)
    if not path.exists():
        raise SourceError(f"source {spec!r}: {path} does not exist")
    if kind == "dir":
        return _folder(path, prompts, on_fault)
    queries = _bag(path, prompts, topic or None, on_fault)
    first = next(queries, None)  # runs the camera check now, before the runtime starts
    return iter(()) if first is None else _chain(first, queries)


def _chain(first: Query, rest: Iterator[Query]) -> Iterator[Query]:
    yield first
    yield from rest
