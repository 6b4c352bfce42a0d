"""The signed envelope around a weight delta, the trust store, and the per-robot version chain.

A ``cdcca_msgs/WeightDelta`` carries a codec payload plus everything a robot needs to decide whether to
trust it: target robot, new and base versions, keyframe flag, codec, parameter count, SHA-256 of the payload
and an Ed25519 signature (RFC 8032, via ``cryptography``). The signature covers every other field: it is
computed over the message's own CDR bytes with the signature field empty, so nothing can be altered or
re-addressed without breaking it.

Versions form a chain per robot. The cloud sends a delta against the version the robot last reported as
applied; a robot that missed versions (or reports none) gets a *keyframe*: a delta against the original
base (version 0), which applies whatever it currently holds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cdcca import wire
from cdcca.errors import CdccaError

_KEY_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class KeyStoreError(CdccaError, ValueError):
    """A key or trust store that cannot be used (missing, malformed, bad id)."""


class DeltaRejected(CdccaError):
    """A weight delta that failed a check; ``reason`` is what the robot publishes in ``AdapterStatus``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ------------------------------------------------------------------------------------------------ keys
def _check_key_id(key_id: str) -> str:
    if not _KEY_ID.match(key_id):
        raise KeyStoreError(f"key id {key_id!r} must be 1-64 characters of letters, digits, '.', '_' or '-'")
    return key_id


def generate_key(directory: str | Path, key_id: str) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair: ``<key_id>.key`` (PEM, mode 0600, stays in the cloud) and ``<key_id>.pub``
    (raw 32 bytes, hex; copy it into each robot's trust store). Refuses to overwrite an existing key."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    private_path, public_path = directory / f"{_check_key_id(key_id)}.key", directory / f"{key_id}.pub"
    if private_path.exists():
        raise KeyStoreError(f"{private_path} exists; pick another key id or remove it deliberately")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())  # fmt: skip
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(pem)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    public_path.write_text(raw.hex() + "\n")
    return private_path, public_path


@dataclass
class Signer:
    """The cloud's signing key and its id."""

    key_id: str
    private_key: Ed25519PrivateKey

    @classmethod
    def load(cls, path: str | Path) -> Signer:
        path = Path(path)
        if not path.is_file():
            raise KeyStoreError(f"no signing key at {path}; create one with `cdcca keys generate --key-id ID`")
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyStoreError(f"{path} is not an Ed25519 private key")
        return cls(_check_key_id(path.stem), key)

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)


@dataclass
class TrustStore:
    """Public keys a robot accepts deltas from: ``<key_id>.pub`` files (hex of the raw 32-byte key) in a folder."""

    keys: dict[str, Ed25519PublicKey] = field(default_factory=dict)

    @classmethod
    def load(cls, directory: str | Path) -> TrustStore:
        directory = Path(directory)
        if not directory.is_dir():
            raise KeyStoreError(f"no trust store at {directory}; add a key with `cdcca keys trust PUBFILE --store DIR`")
        store = cls()
        for path in sorted(directory.glob("*.pub")):
            store.add(path.stem, path.read_text())
        return store

    def add(self, key_id: str, public_hex: str) -> None:
        try:
            raw = bytes.fromhex(public_hex.strip())
            self.keys[_check_key_id(key_id)] = Ed25519PublicKey.from_public_bytes(raw)
        except ValueError as err:
            raise KeyStoreError(f"public key {key_id!r} is not 32 bytes of hex: {err}") from err

    def verify(self, key_id: str, signature: bytes, data: bytes) -> None:
        if key_id not in self.keys:
            raise DeltaRejected(f"unknown signing key {key_id!r}")
        try:
            self.keys[key_id].verify(signature, data)
        except InvalidSignature:
            raise DeltaRejected(f"bad signature (key {key_id!r})") from None


def trust_key(public_file: str | Path, store_dir: str | Path) -> Path:
    """Copy a ``.pub`` file into a trust store after checking it parses; returns the stored path."""
    public_file = Path(public_file)
    TrustStore().add(public_file.stem, public_file.read_text())  # validates
    target = Path(store_dir) / public_file.name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(public_file.read_text())
    return target


# -------------------------------------------------------------------------------------------- envelope
def _signed_bytes(msg) -> bytes:
    return wire.encode(dataclasses.replace(msg, signature=np.zeros(0, np.uint8)))


def seal(payload: bytes, *, robot_id: str, version: int, base_version: int, keyframe: bool, codec: str,
         num_params: int, signer: Signer, stamp_ns: int = 0):  # fmt: skip
    """Wrap a codec payload into a signed ``WeightDelta`` message."""
    msg = wire.new(
        wire.WEIGHT_DELTA, header=wire.header(stamp_ns), robot_id=robot_id, version=version,
        base_version=base_version, keyframe=keyframe, codec=codec, num_params=num_params,
        sha256=np.frombuffer(hashlib.sha256(payload).digest(), np.uint8).copy(), key_id=signer.key_id,
        payload=np.frombuffer(payload, np.uint8).copy(),
    )  # fmt: skip
    msg.signature = np.frombuffer(signer.sign(_signed_bytes(msg)), np.uint8).copy()
    return msg


def open_envelope(msg, *, trust: TrustStore, robot_id: str, current_version: int, expected: dict[str, torch.Tensor],
                  newest_version: int | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """Every check a robot makes before touching its model; returns the decoded delta or raises DeltaRejected.

    Args:
        msg: the received ``WeightDelta``.
        trust: keys this robot accepts.
        robot_id: this robot.
        current_version: the adapter version the robot runs now (the base of an incremental delta).
        newest_version: the newest version it ever applied (after a rollback it is above current_version);
            anything not newer is a replay.
        expected: the trainable set (name -> tensor) the delta must match in names and shapes; it also bounds
            the decode (``num_params``, the payload's names, shapes and inflated size) before it allocates.
    """
    from cdcca.dwc import CodecError, get_codec

    if msg.robot_id != robot_id:
        raise DeltaRejected(f"delta addressed to robot {msg.robot_id!r}, this is {robot_id!r}")
    trust.verify(msg.key_id, bytes(msg.signature), _signed_bytes(msg))
    payload = bytes(np.asarray(msg.payload, np.uint8))
    if hashlib.sha256(payload).digest() != bytes(np.asarray(msg.sha256, np.uint8)):
        raise DeltaRejected("payload SHA-256 does not match")
    newest = current_version if newest_version is None else max(current_version, newest_version)
    if msg.version <= newest:
        raise DeltaRejected(f"version {msg.version} is not newer than {newest} (replayed or out of order)")
    if msg.keyframe and msg.base_version != 0:
        raise DeltaRejected(f"keyframe must be based on version 0, got {msg.base_version}")
    if not msg.keyframe and msg.base_version != current_version:
        raise DeltaRejected(f"delta is based on version {msg.base_version}, this robot runs {current_version}")
    # bounded by this robot's own trainable set before anything is inflated or allocated
    reference = {name: tuple(t.shape) for name, t in expected.items()}
    total = sum(math.prod(shape) for shape in reference.values())
    if msg.num_params != total:
        raise DeltaRejected(f"num_params {msg.num_params} does not match this robot's trainable set ({total} values)")
    try:
        delta = get_codec(msg.codec).decode(payload, reference, strict=True)
    except CodecError as err:
        raise DeltaRejected(f"cannot decode {msg.codec!r} payload: {err}") from err
    missing, extra = set(expected) - set(delta), set(delta) - set(expected)
    if missing or extra:
        raise DeltaRejected(f"delta tensors do not match the trainable set: missing {sorted(missing)[:3]}, "
                            f"unexpected {sorted(extra)[:3]}")  # fmt: skip
    # dtype and finiteness are the codec's guarantee (decode yields finite float32 or raises CodecError)
    for name, tensor in delta.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise DeltaRejected(f"{name}: shape {tuple(tensor.shape)} != {tuple(expected[name].shape)}")
    if sum(t.numel() for t in delta.values()) != msg.num_params:
        raise DeltaRejected(f"num_params {msg.num_params} does not match the payload")
    return delta


# ----------------------------------------------------------------------------------------------- chain
@dataclass
class VersionChain:
    """The cloud's view of one robot: the original base, what it published, what the robot applied.

    Keeps the parameters of the original base (version 0) and of every published version still needed: the
    robot's applied version (the base of the next incremental delta). Older ones are dropped.
    """

    robot_id: str
    base: dict[str, torch.Tensor]
    published: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    latest: int = 0
    applied: int = 0

    def record_applied(self, version: int) -> None:
        """Robot reported ``version`` as its current adapter (AdapterStatus APPLIED or ROLLED_BACK)."""
        self.applied = version
        self.published = {v: p for v, p in self.published.items() if v >= version}

    def make_delta(self, params: dict[str, torch.Tensor], codec_name: str, signer: Signer, stamp_ns: int = 0,
                   importance: dict[str, float] | None = None):  # fmt: skip
        """Publish ``params`` as the next version: incremental against the applied version when the cloud
        still holds it, else a keyframe against the original base. ``importance`` goes to the codec."""
        from cdcca.dwc import apply_delta, compute_delta, get_codec

        version = self.latest + 1
        reference = self.published.get(self.applied) if self.applied else None
        keyframe = reference is None
        base_params, base_version = (self.base, 0) if keyframe else (reference, self.applied)
        delta = compute_delta(params, base_params)
        codec = get_codec(codec_name)
        payload = codec.encode(delta, importance=importance)
        msg = seal(payload, robot_id=self.robot_id, version=version, base_version=base_version, keyframe=keyframe,
                   codec=codec_name, num_params=sum(t.numel() for t in delta.values()), signer=signer,
                   stamp_ns=stamp_ns)  # fmt: skip
        # remember what the robot will actually hold (lossy codecs), so the next incremental delta also
        # carries this round's compression error instead of letting it accumulate
        reference = {name: tuple(t.shape) for name, t in delta.items()}
        self.published[version] = apply_delta(base_params, codec.decode(payload, reference))
        self.latest = version
        return msg

    def keyframe(self, codec_name: str, signer: Signer, stamp_ns: int = 0):
        """The latest published version again, as a keyframe against the original base: what a robot that
        fell behind (missed a delta, or holds a version the cloud no longer keeps) can always apply."""
        from cdcca.dwc import compute_delta, get_codec

        if self.latest == 0:
            raise ValueError(f"robot {self.robot_id}: nothing published yet")
        delta = compute_delta(self.published[self.latest], self.base)
        payload = get_codec(codec_name).encode(delta)
        return seal(payload, robot_id=self.robot_id, version=self.latest, base_version=0, keyframe=True,
                    codec=codec_name, num_params=sum(t.numel() for t in delta.values()), signer=signer,
                    stamp_ns=stamp_ns)  # fmt: skip
