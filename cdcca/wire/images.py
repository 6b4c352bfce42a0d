"""Image encodings on the wire: ``sensor_msgs/Image`` and ``CompressedImage`` to and from RGB arrays.

Encoding names are those of ``sensor_msgs/image_encodings.h``; ``CompressedImage`` formats follow
image_transport (``jpeg``, ``png``, ``rgb8; jpeg compressed bgr8``). Every frame CD-CCA reads -- from a bag,
a raw DDS reader, an rclpy subscription or an ``Ask`` request -- goes through :func:`msg_to_rgb`, which returns
a writable array that owns its memory (frames decoded from CDR are read-only views otherwise).
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image as PILImage

from cdcca.wire import COMPRESSED_IMAGE, IMAGE, WireError, header, new


class ImageEncodingError(WireError):
    """An image message whose encoding, format or size CD-CCA cannot turn into RGB."""



def _with_alpha(rgb: np.ndarray) -> np.ndarray:
    return np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])  # (H, W, 4), opaque


def _luma(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(PILImage.fromarray(rgb).convert("L"))[..., None]  # (H, W, 1), ITU-R 601-2 luma


# encoding -> (channels, to RGB, from RGB) on (H, W, C) uint8; names as in sensor_msgs/image_encodings.h
_ENCODINGS: dict[str, tuple[int, Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {
    "rgb8": (3, lambda px: px, lambda rgb: rgb),
    "bgr8": (3, lambda px: px[..., ::-1], lambda rgb: rgb[..., ::-1]),
    "rgba8": (4, lambda px: px[..., :3], _with_alpha),
    "bgra8": (4, lambda px: px[..., 2::-1], lambda rgb: _with_alpha(rgb[..., ::-1])),
    "mono8": (1, lambda px: np.repeat(px, 3, axis=2), _luma),
}
SUPPORTED_ENCODINGS = tuple(_ENCODINGS)
_CODECS = {"jpeg": "JPEG", "jpg": "JPEG", "png": "PNG"}  # CompressedImage codec word -> Pillow format


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ImageEncodingError(f"expected an RGB uint8 array of shape (H, W, 3), got {rgb.dtype} {rgb.shape}")
    return rgb


def image_to_msg(rgb: np.ndarray, stamp_ns: int = 0, frame_id: str = "", encoding: str = "rgb8") -> Any:
    """A ``sensor_msgs/Image`` holding ``rgb`` (H, W, 3) uint8 in ``encoding``, rows unpadded."""
    if encoding not in _ENCODINGS:
        supported = ", ".join(SUPPORTED_ENCODINGS)
        raise ImageEncodingError(f"cannot write image encoding {encoding!r}; supported: {supported}")
    channels, _, from_rgb = _ENCODINGS[encoding]
    pixels = np.ascontiguousarray(from_rgb(_check_rgb(rgb)))  # (H, W, C)
    height, width = pixels.shape[:2]
    return new(IMAGE, header=header(stamp_ns, frame_id), height=height, width=width,
                    encoding=encoding, step=width * channels, data=pixels.reshape(-1))  # fmt: skip


def compressed_to_msg(
    rgb: np.ndarray, fmt: str = "jpeg", quality: int = 90, stamp_ns: int = 0, frame_id: str = ""
) -> Any:
    """A ``sensor_msgs/CompressedImage`` of ``rgb`` (H, W, 3) uint8; ``fmt`` is ``jpeg`` or ``png`` as in its doc."""
    if fmt not in ("jpeg", "png"):
        raise ImageEncodingError(f"cannot write CompressedImage format {fmt!r}; supported: jpeg, png")
    buffer = io.BytesIO()
    options = {"quality": quality} if fmt == "jpeg" else {}
    PILImage.fromarray(_check_rgb(rgb)).save(buffer, format=_CODECS[fmt], **options)
    data = np.frombuffer(buffer.getvalue(), dtype=np.uint8)
    return new(COMPRESSED_IMAGE, header=header(stamp_ns, frame_id), format=fmt, data=data)


def msg_to_rgb(msg: Any) -> np.ndarray:
    """RGB uint8 (H, W, 3) of a ``sensor_msgs/Image`` or ``CompressedImage`` (ROS 2 or ROS 1 decoded)."""
    if hasattr(msg, "format"):
        return _compressed_to_rgb(msg)
    if msg.encoding not in _ENCODINGS:
        raise ImageEncodingError(
            f"unsupported image encoding {msg.encoding!r}; supported: {', '.join(SUPPORTED_ENCODINGS)} "
            "(and CompressedImage jpeg/png); convert the topic to one of them, e.g. with image_proc"
        )
    channels, to_rgb, _ = _ENCODINGS[msg.encoding]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    data = np.asarray(msg.data, dtype=np.uint8).reshape(-1)
    if step < width * channels or data.size < step * height:
        raise ImageEncodingError(
            f"{msg.encoding} image of {width}x{height} needs step >= {width * channels} and {step * height} bytes, "
            f"got step={step} and {data.size} bytes"
        )
    rows = data[: step * height].reshape(height, step)[:, : width * channels]  # drop row padding
    return np.array(to_rgb(rows.reshape(height, width, channels)), dtype=np.uint8, order="C", copy=True)


def _compressed_to_rgb(msg: Any) -> np.ndarray:
    """Formats follow image_transport: ``jpeg``, ``png`` or ``rgb8; jpeg compressed bgr8``. The trailing
    ``compressed bgr8`` names what OpenCV's imdecode returns; the file itself stores true colour."""
    words = re.findall(r"[a-z0-9]+", msg.format.lower())
    codec = next((word for word in words if word in _CODECS), None)
    if codec is None or "compresseddepth" in words:
        raise ImageEncodingError(f"unsupported CompressedImage format {msg.format!r}; supported: jpeg, png")
    try:
        with PILImage.open(io.BytesIO(np.asarray(msg.data, dtype=np.uint8).tobytes())) as image:
            return np.array(image.convert("RGB"), dtype=np.uint8)
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError... for broken files
        raise ImageEncodingError(f"cannot decode {msg.format!r} CompressedImage: {err}") from err
