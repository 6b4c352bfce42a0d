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
WRITABLE_ENCODINGS = tuple(_ENCODINGS)

_BT601 = np.array([[1.164, 0.0, 1.596], [1.164, -0.392, -0.813], [1.164, 2.017, 0.0]], np.float32)


def _yuv422_to_rgb(pixels: np.ndarray, luma_first: bool) -> np.ndarray:
    """(H, W, 2) bytes of a 4:2:2 image -> RGB. YUYV (``yuv422_yuy2``) stores Y0 U Y1 V, UYVY (``yuv422``,
    ``uyvy``) U Y0 V Y1; each U/V pair is shared by two pixels. ITU-R BT.601 video range, the conversion OpenCV's
    ``COLOR_YUV2RGB_YUY2`` / ``_UYVY`` makes for these ROS encodings (cv_bridge)."""
    height, width = pixels.shape[:2]
    if width % 2:
        raise ImageEncodingError(f"a 4:2:2 image needs an even width, got {width}")
    luma = pixels[..., 0 if luma_first else 1].astype(np.float32)  # (H, W)
    chroma = pixels[..., 1 if luma_first else 0].reshape(height, width // 2, 2).astype(np.float32)  # (H, W/2, UV)
    chroma = np.repeat(chroma, 2, axis=1) - 128.0  # (H, W, 2)
    yuv = np.dstack([luma - 16.0, chroma])  # (H, W, 3)
    return np.clip(yuv @ _BT601.T + 0.5, 0, 255).astype(np.uint8)


def _grey16(pixels: np.ndarray, big_endian: bool, stretch: bool) -> np.ndarray:
    """(H, W, 2) bytes of a 16-bit single-channel image -> grey RGB. ``mono16`` is intensity over the full 16 bits
    (scaled by 1/257); ``16UC1`` is usually depth in millimetres, shown as cv_bridge's ``cvtColorForDisplay``
    does: stretched from 0 to the frame's largest value."""
    values = pixels.view(">u2" if big_endian else "<u2")[..., 0].astype(np.float32)  # (H, W)
    top = float(values.max()) if stretch else 65535.0
    grey = np.zeros_like(values, dtype=np.uint8) if top <= 0 else np.clip(values * (255.0 / top) + 0.5, 0, 255)
    return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)


# encodings read but never written: encoding -> (bytes per pixel, (H, W, bytes) and is_bigendian -> RGB)
_READ_ONLY: dict[str, tuple[int, Callable[[np.ndarray, bool], np.ndarray]]] = {
    "yuv422": (2, lambda px, _: _yuv422_to_rgb(px, luma_first=False)),  # image_encodings.h: UYVY
    "uyvy": (2, lambda px, _: _yuv422_to_rgb(px, luma_first=False)),
    "yuv422_yuy2": (2, lambda px, _: _yuv422_to_rgb(px, luma_first=True)),  # YUYV
    "yuyv": (2, lambda px, _: _yuv422_to_rgb(px, luma_first=True)),
    "mono16": (2, lambda px, big: _grey16(px, big, stretch=False)),
    "16UC1": (2, lambda px, big: _grey16(px, big, stretch=True)),
}
SUPPORTED_ENCODINGS = WRITABLE_ENCODINGS + tuple(_READ_ONLY)
_CODECS = {"jpeg": "JPEG", "jpg": "JPEG", "png": "PNG"}  # CompressedImage codec word -> Pillow format


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ImageEncodingError(f"expected an RGB uint8 array of shape (H, W, 3), got {rgb.dtype} {rgb.shape}")
    return rgb


def image_to_msg(rgb: np.ndarray, stamp_ns: int = 0, frame_id: str = "", encoding: str = "rgb8") -> Any:
    """A ``sensor_msgs/Image`` holding ``rgb`` (H, W, 3) uint8 in ``encoding``, rows unpadded."""
    if encoding not in _ENCODINGS:
        supported = ", ".join(WRITABLE_ENCODINGS)
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
    encoding = str(msg.encoding)
    if encoding in _ENCODINGS:
        channels, to_rgb, _ = _ENCODINGS[encoding]
        convert = lambda px: to_rgb(px)  # noqa: E731
    elif encoding in _READ_ONLY:
        channels, decode = _READ_ONLY[encoding]
        convert = lambda px: decode(px, bool(getattr(msg, "is_bigendian", 0)))  # noqa: E731
    else:
        raise ImageEncodingError(
            f"unsupported image encoding {encoding!r}; supported: {', '.join(SUPPORTED_ENCODINGS)} "
            "(and CompressedImage jpeg/png); convert the topic to one of them, e.g. with image_proc"
        )
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    data = np.asarray(msg.data, dtype=np.uint8).reshape(-1)
    if height < 1 or width < 1 or step < width * channels or data.size < step * height:
        raise ImageEncodingError(
            f"{encoding} image of {width}x{height} needs step >= {width * channels} and {step * height} bytes, "
            f"got step={step} and {data.size} bytes"
        )
    rows = data[: step * height].reshape(height, step)[:, : width * channels]  # drop row padding
    return np.array(convert(rows.reshape(height, width, channels)), dtype=np.uint8, order="C", copy=True)


# 8K UHD: more than any camera a robot carries. A PNG of a few kB can claim a canvas of tens of megapixels (under
# Pillow's own bomb limit of 89 M) and inflate to a gigabyte; its header says so before anything is decoded.
MAX_COMPRESSED_PIXELS = 7680 * 4320


def _compressed_to_rgb(msg: Any) -> np.ndarray:
    """Formats follow image_transport: ``jpeg``, ``png`` or ``rgb8; jpeg compressed bgr8``. The trailing
    ``compressed bgr8`` names what OpenCV's imdecode returns; the file itself stores true colour."""
    words = re.findall(r"[a-z0-9]+", msg.format.lower())
    codec = next((word for word in words if word in _CODECS), None)
    if codec is None or "compresseddepth" in words:
        raise ImageEncodingError(f"unsupported CompressedImage format {msg.format!r}; supported: jpeg, png")
    try:
        with PILImage.open(io.BytesIO(np.asarray(msg.data, dtype=np.uint8).tobytes())) as image:
            if image.width * image.height > MAX_COMPRESSED_PIXELS:  # read from the header, before any decoding
                raise ImageEncodingError(
                    f"{msg.format!r} CompressedImage of {image.width}x{image.height} is larger than any camera's "
                    f"frame (at most {MAX_COMPRESSED_PIXELS} pixels): not decoded"
                )
            return np.array(image.convert("RGB"), dtype=np.uint8)
    except ImageEncodingError:
        raise
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError... for broken files
        raise ImageEncodingError(f"cannot decode {msg.format!r} CompressedImage: {err}") from err
