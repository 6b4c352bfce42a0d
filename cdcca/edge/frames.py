"""The robot's latest camera frame: kept as received, converted to RGB only when a prompt needs it."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from cdcca import wire
from cdcca.errors import CdccaError
from cdcca.wire.images import ImageEncodingError, msg_to_rgb


class NoFrameError(CdccaError, RuntimeError):
    """No usable camera frame to answer about; check that the camera topic is published (``ros2 topic hz``)."""


Frame = tuple[np.ndarray, int, str]  # (RGB (H, W, 3) uint8, capture stamp ns, frame_id)


class LatestFrame:
    """The newest camera message (cameras outpace prompts, so only the newest is ever converted).

    Args:
        clock: monotonic seconds, for the frame's age (receive time, so bag replay and sim time do not matter).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._msg: Any = None
        self._received_at = 0.0
        self._rgb: Frame | None = None
        self.received = 0
        self.bad = 0

    def update(self, msg: Any) -> None:
        """Keep ``msg`` (a decoded ``sensor_msgs/Image`` or ``CompressedImage``, wire or IDL object)."""
        with self._lock:
            self._msg, self._received_at, self._rgb = msg, self._clock(), None
            self.received += 1

    def age_s(self) -> float:
        """Seconds since the latest frame arrived (infinite before the first)."""
        with self._lock:
            return math.inf if self._msg is None else self._clock() - self._received_at

    def get(self, max_age_s: float = 0.0) -> Frame:
        """The latest frame; :class:`NoFrameError` if none is usable (none yet, older than ``max_age_s`` when that
        is > 0, or an encoding we cannot read)."""
        with self._lock:
            if self._msg is None:
                raise NoFrameError("no camera frame received yet; check the camera topic and its QoS")
            age = self._clock() - self._received_at
            if max_age_s > 0 and age > max_age_s:
                raise NoFrameError(f"the latest camera frame is {age:.1f} s old (max_frame_age_s={max_age_s})")
            if self._rgb is None:
                try:
                    rgb = msg_to_rgb(self._msg)
                except ImageEncodingError as err:
                    self.bad += 1
                    self._msg = None
                    raise NoFrameError(f"camera frame rejected: {err}") from err
                self._rgb = (rgb, wire.stamp_ns(self._msg.header), str(self._msg.header.frame_id))
            return self._rgb


def frame_of_request(image_msg: Any) -> Frame | None:
    """The frame of an ``Ask`` request, or ``None`` when it is empty (width 0: use the latest camera frame)."""
    if image_msg is None or int(image_msg.width) == 0:
        return None
    try:
        return msg_to_rgb(image_msg), wire.stamp_ns(image_msg.header), str(image_msg.header.frame_id)
    except ImageEncodingError as err:
        raise NoFrameError(f"the request's image cannot be used: {err}") from err
