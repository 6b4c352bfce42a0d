"""Bags: record and replay what the robot saw, as rosbag2 (MCAP or SQLite3) that ``ros2 bag`` can play.

A stream bag holds a camera topic, the prompts asked about it and, for evaluation only, the ground truth.
Offline adaptation replays one through the same EdgeRuntime and cloud trainer as a live robot, so a bag
written here must read back as the same :class:`~cdcca.data.sample.Sample` stream it was made from.

Messages are the CDR bytes of :mod:`cdcca.wire` (what a ROS 2 Jazzy node publishes), stored with
``rosbags``; storage is auto-detected when reading: a rosbag2 directory, a bare ``.db3``/``.mcap`` file,
or a ROS 1 ``.bag``. That covers RealSense SDK recordings: SDK 2.59 writes a bare rosbag2 ``.db3``
with ``CompressedImage`` frames on ``/device_0/sensor_N/Color_0/image/data/compressed``;
older SDKs wrote ROS 1 ``.bag`` with ``Image`` on ``/device_0/sensor_1/Color_0/image/data``. Camera
topics are therefore recognised by message type, never by name.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rosbags.highlevel import AnyReader
from rosbags.rosbag2 import StoragePlugin, Writer, WriterError

from cdcca import wire
from cdcca.data.digits_shift import TARGET_DOMAINS, load_domain
from cdcca.data.sample import TASKS, Sample
from cdcca.errors import CdccaError
from cdcca.wire.images import (  # noqa: F401  (the image encodings are wire facts; kept importable from here)
    SUPPORTED_ENCODINGS,
    ImageEncodingError,
    compressed_to_msg,
    image_to_msg,
    msg_to_rgb,
)
from cdcca.wire.topics import CAMERA_FRAME_ID, CAMERA_TOPIC, GROUND_TRUTH_TOPIC, PROMPT_TOPIC  # noqa: F401

log = logging.getLogger(__name__)

STORAGES = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}
ROSBAG2_VERSION = 9  # metadata.yaml version that Jazzy's rosbag2 writes
DEFAULT_FRAME_PERIOD_NS = 100_000_000  # 10 Hz camera
DEFAULT_START_NS = 1_700_000_000 * 10**9  # a fixed epoch so that the same samples give the same bag
TRUTH_FIELDS = ("sample_id", "domain", "task", "answers", "choices", "correct_idx", "references", "target")


class BagError(CdccaError, ValueError):
    """A bag that cannot be opened or written, or a message in it that cannot be used."""


# ------------------------------------------------------------------------------------------------ writing


@dataclass
class BagSummary:
    """What a bag writer wrote.

    Args:
        path: the rosbag2 directory.
        storage: ``mcap`` or ``sqlite3``.
        counts: messages written per topic.
    """

    path: Path
    storage: str
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def messages(self) -> int:
        return sum(self.counts.values())


class BagWriter:
    """A new rosbag2 directory, written as a context manager; connections are added on first use."""

    def __init__(self, path: str | Path, storage: str = "mcap") -> None:
        if storage not in STORAGES:
            raise BagError(f"storage must be one of {sorted(STORAGES)}, got {storage!r}")
        self.path, self.storage = Path(path), storage
        try:
            self._writer = Writer(self.path, version=ROSBAG2_VERSION, storage_plugin=STORAGES[storage])
        except WriterError as err:
            raise BagError(f"cannot write a bag at {self.path}: {err} Choose a new path or delete it.") from err
        self._connections: dict[tuple[str, str], Any] = {}
        self.counts: Counter[str] = Counter()

    def __enter__(self) -> BagWriter:
        self._writer.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._writer.__exit__(*exc_info)

    def write(self, topic: str, msg: Any, stamp_ns: int) -> None:
        """Encode ``msg`` (built by :func:`cdcca.wire.new`) and store it at receive time ``stamp_ns``."""
        data = wire.encode(msg)  # raises WireError for anything that is not a registered message
        self.write_cdr(topic, msg.__msgtype__, stamp_ns, data)

    def write_cdr(self, topic: str, msgtype: str, stamp_ns: int, data: bytes) -> None:
        """Store CDR bytes as they are (e.g. relayed from a link) without decoding them."""
        key = (topic, wire.canonical(msgtype))
        if key not in self._connections:
            self._connections[key] = self._writer.add_connection(topic, key[1], typestore=wire.TYPESTORE)
        self._writer.write(self._connections[key], int(stamp_ns), data)
        self.counts[topic] += 1

    def summary(self) -> BagSummary:
        return BagSummary(self.path, self.storage, dict(self.counts))


def _truth_json(sample: Sample) -> str:
    return json.dumps({name: getattr(sample, name) for name in TRUTH_FIELDS})


def write_stream_bag(
    path: str | Path,
    samples: Iterable[Sample],
    storage: str = "mcap",
    frame_period_ns: int = DEFAULT_FRAME_PERIOD_NS,
    start_ns: int = DEFAULT_START_NS,
) -> BagSummary:
    """Write a sample stream as a camera + prompt + ground-truth bag.

    Consecutive samples about the same image share one ``Image`` (rgb8) on :data:`CAMERA_TOPIC`; after it,
    each sample's prompt (:data:`PROMPT_TOPIC`) then its ground truth (:data:`GROUND_TRUTH_TOPIC`, JSON of
    :data:`TRUTH_FIELDS`) are spread evenly inside the frame period, so timestamps strictly increase.
    """
    groups: list[list[Sample]] = []
    for sample in samples:
        image = sample.load_image()
        previous = groups[-1][0].image if groups else None
        if previous is not None and (previous is image or np.array_equal(previous, image)):
            groups[-1].append(sample)
        else:
            groups.append([sample])
    with BagWriter(path, storage) as bag:
        for index, group in enumerate(groups):
            frame_ns = start_ns + index * frame_period_ns
            step_ns = frame_period_ns // (2 * len(group) + 1)
            if step_ns < 1:
                raise BagError(f"frame_period_ns={frame_period_ns} is too short for {2 * len(group)} messages")
            bag.write(CAMERA_TOPIC, image_to_msg(group[0].image, frame_ns, CAMERA_FRAME_ID), frame_ns)
            for number, sample in enumerate(group):
                prompt_ns = frame_ns + (2 * number + 1) * step_ns
                bag.write(PROMPT_TOPIC, wire.new(wire.STRING, data=sample.prompt), prompt_ns)
                bag.write(GROUND_TRUTH_TOPIC, wire.new(wire.STRING, data=_truth_json(sample)), prompt_ns + step_ns)
    return bag.summary()


def make_stream_bag(
    path: str | Path,
    domains: Iterable[str] = TARGET_DOMAINS,
    split: str = "stream",
    limit: int | None = None,
    storage: str = "mcap",
    tasks: tuple[str, ...] = TASKS,
    seed: int = 0,
) -> BagSummary:
    """The digits-shift target stream (domains in the given order) as a bag, for ``cdcca make-bag``.

    Args:
        path: new rosbag2 directory to create.
        domains: digits-shift domains, streamed one after the other.
        split: ``stream`` (what the robot sees online) or another split of :mod:`cdcca.data.digits_shift`.
        limit: images per domain (each yields one prompt per task); ``None`` for all.
        storage: ``mcap`` or ``sqlite3``.
        tasks: which tasks' prompts to include.
        seed: rendering seed of :func:`~cdcca.data.digits_shift.load_domain`.
    """
    samples = [s for domain in domains for s in load_domain(domain, split, limit=limit, tasks=tasks, seed=seed)]
    return write_stream_bag(path, samples, storage=storage)


# ------------------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class Frame:
    """A camera image; ``stamp_ns`` is the bag's receive time, ``rgb`` is (H, W, 3) uint8."""

    topic: str
    stamp_ns: int
    frame_id: str
    rgb: np.ndarray


@dataclass(frozen=True)
class Prompt:
    topic: str
    stamp_ns: int
    text: str


@dataclass(frozen=True)
class GroundTruth:
    """The JSON record of :data:`TRUTH_FIELDS` for the prompt just before it."""

    topic: str
    stamp_ns: int
    record: dict[str, Any]


@dataclass(frozen=True)
class CdccaMessage:
    """A decoded ``cdcca_msgs`` message (UtsTokens, WeightDelta, AdapterStatus, Answer) on any topic."""

    topic: str
    stamp_ns: int
    msgtype: str
    msg: Any


BagEvent = Frame | Prompt | GroundTruth | CdccaMessage


@dataclass
class ReadStats:
    """What a read saw, per topic. Pass one to :func:`read_bag` / :func:`read_samples` to get the counts.

    Args:
        events: messages turned into events.
        skipped: bad messages (malformed CDR, unsupported image, bad JSON) dropped; logged at the 1st, 2nd, 4th...
            of a topic.
        ignored: messages of types CD-CCA does not use (camera_info, tf, RealSense metadata, ...).
        unpaired: prompts with no frame before them and ground truths with no prompt (read_samples only).
    """

    events: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    ignored: Counter[str] = field(default_factory=Counter)
    unpaired: int = 0


def _event(topic: str, msgtype: str, stamp_ns: int, msg: Any) -> BagEvent:
    if msgtype in (wire.IMAGE, wire.COMPRESSED_IMAGE):
        return Frame(topic, stamp_ns, msg.header.frame_id, msg_to_rgb(msg))
    if topic == PROMPT_TOPIC:
        return Prompt(topic, stamp_ns, msg.data)
    if topic == GROUND_TRUTH_TOPIC:
        try:
            record = json.loads(msg.data)
        except json.JSONDecodeError as err:
            raise BagError(f"ground truth is not JSON: {err}") from err
        missing = set(TRUTH_FIELDS) - set(record) if isinstance(record, dict) else set(TRUTH_FIELDS)
        if missing:
            raise BagError(f"ground truth record lacks {sorted(missing)}")
        return GroundTruth(topic, stamp_ns, record)
    return CdccaMessage(topic, stamp_ns, msgtype, msg)


def _used(topic: str, msgtype: str) -> bool:
    return (msgtype in (wire.IMAGE, wire.COMPRESSED_IMAGE) or msgtype.startswith("cdcca_msgs/")
            or (msgtype == wire.STRING and topic in (PROMPT_TOPIC, GROUND_TRUTH_TOPIC)))  # fmt: skip


def _open_reader(path: Path) -> AnyReader:
    if not path.exists():
        raise BagError(f"bag {path} does not exist; pass a rosbag2 directory, a .db3/.mcap file or a ROS 1 .bag")
    try:
        reader = AnyReader([path], default_typestore=wire.TYPESTORE)  # the default serves bags without msgdefs
        reader.open()
    except Exception as err:  # rosbags raises its own reader, typesys and OS errors here
        raise BagError(f"cannot open bag {path}: {err}") from err
    return reader


@dataclass(frozen=True)
class CameraChoice:
    """The camera topic a replay reads and whether the bag carries its own prompts (:data:`PROMPT_TOPIC`)."""

    topic: str
    has_prompts: bool


def choose_camera_topic(path: str | Path, topic: str | None = None) -> CameraChoice:
    """The Image/CompressedImage topic to replay: ``topic``, or the first whose first frame can be read, colour
    topics first (a name with ``color``, ``colour`` or ``rgb`` in it: a RealSense recording holds its depth stream as
    a ``mono16`` Image, which reads as grey, beside the colour one).

    Each camera topic's first message is decoded before replay, so an unsupported encoding (16UC1 depth,
    yuv422) is refused once, naming the topic and the encoding, instead of once per frame. Unusable topics
    are skipped with one warning when another camera topic works.
    """
    path = Path(path)
    reader = _open_reader(path)
    try:
        cameras = [c for c in reader.connections if c.msgtype in (wire.IMAGE, wire.COMPRESSED_IMAGE)]
        has_prompts = any(c.topic == PROMPT_TOPIC and c.msgtype == wire.STRING for c in reader.connections)
        names = sorted({c.topic for c in cameras})
        if topic is not None:
            cameras = [c for c in cameras if c.topic == topic]
            if not cameras:
                raise BagError(f"bag {path} has no camera topic {topic}; "
                               f"its camera topics: {', '.join(names) or 'none'}")  # fmt: skip
        if not cameras:
            raise BagError(f"bag {path} has no sensor_msgs/Image or CompressedImage topic")
        cameras.sort(key=lambda c: not re.search(r"colou?r|rgb", c.topic, re.IGNORECASE))  # stable: colour first
        problems: dict[str, str] = {}
        for connection in cameras:
            if connection.topic in problems:
                continue
            first = next(_messages(reader, path, connections=[connection]), None)
            if first is None:
                problems[connection.topic] = "no messages"
                continue
            try:
                raw, msgtype = first[2], connection.msgtype
                msg = wire.decode(msgtype, raw) if reader.is2 else reader.deserialize(raw, msgtype)
                msg_to_rgb(msg)
            except Exception as err:  # ImageEncodingError, WireError or ROS 1 deserialisation errors
                problems[connection.topic] = str(err)
                continue
            if problems:
                log.warning("bag %s: skipping camera topics it cannot read (%s); replaying %s", path,
                            "; ".join(f"{t}: {why}" for t, why in problems.items()), connection.topic)  # fmt: skip
            return CameraChoice(connection.topic, has_prompts)
        detail = "; ".join(f"{t}: {why}" for t, why in problems.items())
        raise BagError(
            f"bag {path} has no camera topic CD-CCA can read ({detail}); "
            f"supported encodings: {', '.join(SUPPORTED_ENCODINGS)}, or a jpeg/png CompressedImage"
        )
    finally:
        reader.close()


def _messages(reader, path: Path, **selection) -> Iterator[tuple]:
    """``reader.messages(**selection)``, but a file that breaks while it is read (a record longer than the file, a
    malformed SQLite page, a ROS 1 index that contradicts its chunk: rosbags, apsw and the ROS 1 reader each raise
    their own types) ends the iteration with a :class:`BagError`."""
    try:
        yield from reader.messages(**selection)
    except Exception as err:
        raise BagError(f"bag {path} is corrupt where it was being read ({type(err).__name__}: {err})") from err


def read_bag(path: str | Path, stats: ReadStats | None = None, topics: Iterable[str] | None = None,
             on_skip: Callable[[str, str, int, Exception], None] | None = None) -> Iterator[BagEvent]:  # fmt: skip
    """Events of a bag in receive-time order; bad messages are logged, counted in ``stats`` and skipped.

    ``topics``: read only these (others count as ignored); ``None`` reads every topic CD-CCA uses.
    ``on_skip(topic, msgtype, stamp_ns, error)``: told of each bad message instead of the log (e.g. a runtime that
    counts its faults and logs them itself).
    """
    path, stats = Path(path), stats if stats is not None else ReadStats()
    wanted = None if topics is None else set(topics)
    reader = _open_reader(path)
    try:
        for connection, stamp_ns, raw in _messages(reader, path):
            topic, msgtype = connection.topic, connection.msgtype
            if not _used(topic, msgtype) or (wanted is not None and topic not in wanted):
                stats.ignored[topic] += 1
                continue
            try:
                msg = wire.decode(msgtype, raw) if reader.is2 else reader.deserialize(raw, msgtype)
                event = _event(topic, msgtype, stamp_ns, msg)
            except Exception as err:  # WireError, BagError, or ROS 1 deserialisation errors
                stats.skipped[topic] += 1
                count = stats.skipped[topic]
                if on_skip is not None:
                    on_skip(topic, msgtype, stamp_ns, err)
                elif count & (count - 1) == 0:  # the 1st, 2nd, 4th, 8th... per topic: a broken bag cannot flood the log
                    log.warning("skipping %s message on %s at %d ns (%d skipped on this topic so far): %s", msgtype,
                                topic, stamp_ns, count, err)  # fmt: skip
                continue
            stats.events[topic] += 1
            yield event
    finally:
        reader.close()


def read_samples(path: str | Path, stats: ReadStats | None = None) -> list[Sample]:
    """The bag as Samples: each prompt about the latest frame before it, labelled by the ground truth after it.

    A prompt without ground truth (a robot's own recording) becomes an unlabelled ``vqa`` sample of domain
    ``unlabelled``, enough to replay it through the runtime.
    """
    stats = stats if stats is not None else ReadStats()
    samples: list[Sample] = []
    frame: Frame | None = None
    pending: tuple[Prompt, Frame] | None = None  # the last prompt and its frame, until its ground truth arrives

    def flush(truth: dict[str, Any] | None) -> None:
        prompt, prompt_frame = pending
        fields = {"sample_id": f"{Path(path).name}@{prompt.stamp_ns}", "domain": "unlabelled", "task": "vqa"}
        fields.update({name: truth[name] for name in TRUTH_FIELDS} if truth else {})
        samples.append(Sample(prompt=prompt.text, image=prompt_frame.rgb, **fields))

    for event in read_bag(path, stats):
        if isinstance(event, Frame):
            frame = event
        elif isinstance(event, Prompt):
            if pending is not None:
                flush(None)
            pending = (event, frame) if frame is not None else None
            if frame is None:
                stats.unpaired += 1
        elif isinstance(event, GroundTruth):
            if pending is None:
                stats.unpaired += 1
                continue
            try:
                flush(event.record)
            except (TypeError, ValueError) as err:  # Sample validation: unknown task, bad correct_idx
                log.warning("skipping ground truth on %s at %d ns: %s", event.topic, event.stamp_ns, err)
                stats.skipped[event.topic] += 1
            pending = None
    if pending is not None:
        flush(None)
    return samples
