"""The signed envelope around a weight delta, the trust store, and the per-robot version chain.

A ``cdcca_msgs/WeightDelta`` carries a codec payload plus everything a robot needs to decide whether to
trust it: target robot, new and base versions, keyframe flag, codec, parameter count, SHA-256 of the payload
and an Ed25519 signature (RFC 8032, via ``cryptography``). The signature covers every other field: it is
computed over the message's own CDR bytes with the signature field empty, so nothing can be altered or
re-addressed without breaking it.

Versions form a chain per robot. The cloud sends a delta against the version the robot last reported as
applied; a robot that missed versions (or reports none) gets a *keyframe*: a delta against the original
base (version 0), which applies whatever it currently holds.

The same key signs each ``UtsAck`` (:func:`sign_ack`, over :func:`ack_signed_bytes`), so only the cloud can make
a robot delete queued samples; the robot checks it with :func:`verify_ack` against the same trust store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cdcca import wire
from cdcca.errors import CdccaError
from cdcca.paths import write_atomic

if TYPE_CHECKING:  # the cloud side (VersionChain) works on torch tensors; a robot on ONNX Runtime never imports it
    import torch

log = logging.getLogger(__name__)
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
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as err:  # not PEM, or a public key / another format passed as --key
            why = (str(err).splitlines() or [type(err).__name__])[0]
            raise KeyStoreError(f"{path} is not a PEM private key ({why}); --key takes the .key file "
                                "`cdcca keys generate` writes, not its .pub") from None  # fmt: skip
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyStoreError(f"{path} is not an Ed25519 private key")
        return cls(_check_key_id(path.stem), key)

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)


def fingerprint(public_hex: str) -> str:
    """SHA-256 (hex) of a raw Ed25519 public key: what ``cdcca keys list`` shows, to compare keys out of band."""
    return hashlib.sha256(bytes.fromhex(public_hex.strip())).hexdigest()


def _public_key(key_id: str, public_hex: str) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex.strip()))
    except ValueError as err:
        raise KeyStoreError(f"public key {key_id!r} is not 32 bytes of hex: {err}") from err


def _raw_hex(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


@dataclass
class TrustStore:
    """Public keys a robot accepts deltas from: ``<key_id>.pub`` files (hex of the raw 32-byte key) in a folder,
    and ``<key_id>.revoked`` markers (the revoked key's fingerprint) for keys whose deltas are rejected.

    Several keys may be trusted at once (a rotation overlaps the old and the new key). Revocation is permanent:
    a revoked key (by id or by fingerprint) cannot be trusted again. A store loaded from a folder re-reads it
    for an unknown key id and checks the revocation markers on every verification, so ``cdcca keys trust`` /
    ``revoke`` / ``accept`` take effect on a running robot without a restart.
    """

    keys: dict[str, Ed25519PublicKey] = field(default_factory=dict)
    revoked: dict[str, str] = field(default_factory=dict)  # key_id -> fingerprint of the revoked key
    directory: Path | None = None

    @classmethod
    def load(cls, directory: str | Path) -> TrustStore:
        directory = Path(directory)
        if not directory.is_dir():
            raise KeyStoreError(f"no trust store at {directory}; add a key with `cdcca keys trust PUBFILE --store DIR`")
        if not os.access(directory, os.R_OK | os.X_OK):  # it would list as empty: a robot trusting no key at all
            raise KeyStoreError(f"the trust store {directory} cannot be read; check its permissions")
        store = cls(directory=directory)
        for path in sorted(directory.glob("*.revoked")):
            store.revoked[_check_key_id(path.stem)] = path.read_text().strip()
        for path in sorted(directory.glob("*.pub")):
            if path.stem in store.revoked:
                continue
            key = _raw_hex(_public_key(path.stem, path.read_text()))  # a malformed file is an error, as before
            if fingerprint(key) in store.revoked.values():  # a revoked key copied in under a new name
                log.warning("trust store %s: %s holds a revoked key; not trusted", directory, path.name)
                continue
            twin = store.trusted_as(fingerprint(key))
            if twin is not None:  # a folder from a release that allowed it: kept, a signer may use either id
                log.warning("trust store %s: %s holds the key also trusted as %r; revoking either id ends both",
                            directory, path.name, twin)  # fmt: skip
                store.keys[path.stem] = _public_key(path.stem, key)
                continue
            store.add(path.stem, key)
        return store

    def fingerprints(self) -> dict[str, str]:
        """key_id -> fingerprint of every trusted key."""
        return {key_id: fingerprint(_raw_hex(key)) for key_id, key in self.keys.items()}

    def add(self, key_id: str, public_hex: str) -> None:
        """Trust a key (in memory). Adding the same key again is a no-op; a different key under a trusted id, a
        revoked id or a revoked key is refused: replacing a key is a rotation, not a silent overwrite."""
        key = _public_key(_check_key_id(key_id), public_hex)
        new = fingerprint(_raw_hex(key))
        if key_id in self.revoked or new in self.revoked.values():
            raise KeyStoreError(f"key {key_id!r} ({new[:16]}...) was revoked; revocation is permanent, generate a "
                                "new key")  # fmt: skip
        if key_id in self.keys and _raw_hex(self.keys[key_id]) != _raw_hex(key):
            raise KeyStoreError(f"a different key is already trusted as {key_id!r} "
                                f"({self.fingerprints()[key_id][:16]}... vs {new[:16]}...); trust the new key under a "
                                f"new id, and revoke {key_id!r} if it is to go")  # fmt: skip
        twin = self.trusted_as(new)
        if twin not in (None, key_id):  # revoking one of two ids would leave a restarted robot with no key at all
            raise KeyStoreError(f"this key ({new[:16]}...) is already trusted as {twin!r}; a key is trusted under "
                                "one id")  # fmt: skip
        self.keys[key_id] = key

    def trusted_as(self, key_fingerprint: str) -> str | None:
        """The id a key (by its fingerprint) is trusted under, or ``None``."""
        return next((k for k, f in self.fingerprints().items() if f == key_fingerprint), None)

    def revoke(self, key_id: str) -> str:
        """Reject ``key_id``'s deltas from now on (persisted as ``<key_id>.revoked`` when loaded from a folder);
        returns the revoked key's fingerprint. Refuses to revoke the last trusted key: the robot would accept no
        update at all; trust its successor first."""
        self._refresh(key_id)
        if key_id in self.revoked:
            return self.revoked[key_id]
        if key_id not in self.keys:
            raise KeyStoreError(f"no trusted key {key_id!r} to revoke; trusted: {sorted(self.keys)}")
        revoked = self.fingerprints()[key_id]
        if set(self.fingerprints().values()) == {revoked}:  # by key: one key under two ids (an old store) is one
            raise KeyStoreError(f"{key_id!r} is the only trusted key; trust its successor first (`cdcca keys trust` or "
                                "`cdcca keys accept`), then revoke it")  # fmt: skip
        if self.directory is not None:
            write_atomic(self.directory / f"{key_id}.revoked", revoked + "\n")
        self.revoked[key_id] = revoked
        for twin in [k for k, f in self.fingerprints().items() if f == revoked]:
            del self.keys[twin]
        return revoked

    def _refresh(self, key_id: str) -> None:
        """Pick up what ``cdcca keys`` changed in the folder since :meth:`load` (one listing per call: a revocation
        under any id, since a store an older release wrote may hold one key under two)."""
        if self.directory is None or not _KEY_ID.match(key_id):
            return
        for marker in self.directory.glob("*.revoked"):
            if marker.stem not in self.revoked and _KEY_ID.match(marker.stem):
                self.revoked[marker.stem] = marker.read_text().strip()
                self.keys.pop(marker.stem, None)
        public = self.directory / f"{key_id}.pub"
        if key_id not in self.keys and key_id not in self.revoked and public.is_file():
            self.add(key_id, public.read_text())

    def verify(self, key_id: str, signature: bytes, data: bytes) -> None:
        try:
            self._refresh(key_id)
        except (KeyStoreError, OSError) as err:
            raise DeltaRejected(f"trust store unreadable for key {key_id!r}: {err}") from None
        if key_id in self.revoked:
            raise DeltaRejected(f"signing key {key_id!r} is revoked")
        if key_id not in self.keys:
            raise DeltaRejected(f"unknown signing key {key_id!r}")
        held = self.fingerprints()[key_id]
        revoked_as = next((k for k, f in self.revoked.items() if f == held), None)
        if revoked_as is not None:  # the same key revoked under another id (an old store held it under two)
            raise DeltaRejected(f"signing key {key_id!r} is revoked (as {revoked_as!r})")
        try:
            self.keys[key_id].verify(signature, data)
        except InvalidSignature:
            raise DeltaRejected(f"bad signature (key {key_id!r})") from None

    def accept(self, statement: KeyStatement) -> None:
        """Apply a :class:`KeyStatement` signed by a key this store trusts: trust its key, or revoke one.
        Persisted to the folder when loaded from one. KeyStoreError if the signature does not verify."""
        statement.verify(self)
        if statement.action == "revoke":
            self.revoke(statement.key_id)
            return
        self.add(statement.key_id, statement.public_key)
        if self.directory is not None:
            write_atomic(self.directory / f"{statement.key_id}.pub", statement.public_key + "\n")


STATEMENT_CONTEXT = b"cdcca key statement v1\n"  # domain separation: a statement's signature is never a delta's


@dataclass(frozen=True)
class KeyStatement:
    """A key rotation or revocation, signed by a key the robots already trust, so it may travel over any channel
    (a file copy, the fleet's config push): robots verify it against their own trust store, no re-flash.

    Args:
        action: ``trust`` (add ``key_id`` with ``public_key``) or ``revoke`` (reject ``key_id`` from now on).
        key_id: the key the statement is about.
        public_key: hex of its raw 32-byte Ed25519 public key (``trust`` only; empty for ``revoke``).
        signer: id of the trusted key that signed the statement.
        issued_unix: when it was signed (informational).
        signature: Ed25519 signature over :data:`STATEMENT_CONTEXT` and the canonical JSON of the other fields.
    """

    action: str
    key_id: str
    public_key: str
    signer: str
    issued_unix: float
    signature: str = ""

    def __post_init__(self) -> None:
        if self.action not in ("trust", "revoke"):
            raise KeyStoreError(f"KeyStatement.action must be 'trust' or 'revoke', got {self.action!r}")
        _check_key_id(self.key_id)
        _check_key_id(self.signer)
        if self.action == "trust":
            _public_key(self.key_id, self.public_key)
        elif self.public_key:
            raise KeyStoreError("a 'revoke' statement carries no public_key")

    def signed_bytes(self) -> bytes:
        body = {"action": self.action, "key_id": self.key_id, "public_key": self.public_key.strip().lower(),
                "signer": self.signer, "issued_unix": self.issued_unix}  # fmt: skip
        return STATEMENT_CONTEXT + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def sign(cls, signer: Signer, action: str, key_id: str, public_key: str = "", issued_unix: float = 0.0):
        """A statement by ``signer`` (the cloud's current key) about ``key_id``."""
        unsigned = cls(action, key_id, public_key.strip().lower(), signer.key_id, float(issued_unix))
        return dataclasses.replace(unsigned, signature=signer.sign(unsigned.signed_bytes()).hex())

    def verify(self, trust: TrustStore) -> None:
        """KeyStoreError unless a key ``trust`` holds (not revoked) signed this statement."""
        try:
            trust.verify(self.signer, bytes.fromhex(self.signature), self.signed_bytes())
        except (DeltaRejected, ValueError) as err:
            raise KeyStoreError(f"statement about {self.key_id!r} is not signed by a trusted key: {err}") from None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> KeyStatement:
        try:
            fields = json.loads(text)
            names = {f.name for f in dataclasses.fields(cls)}
            if not isinstance(fields, dict) or set(fields) != names:
                raise ValueError(f"expected the fields {sorted(names)}")
            if not all(isinstance(fields[n], str) for n in names - {"issued_unix"}) or \
                    not isinstance(fields["issued_unix"], (int, float)):  # fmt: skip
                raise ValueError("wrong field types")
            return cls(**fields)
        except (ValueError, RecursionError) as err:  # json.JSONDecodeError is one; thousands of "[" nest too deep
            raise KeyStoreError(f"not a key statement: {type(err).__name__}: {err}") from None


def trust_key(public_file: str | Path, store_dir: str | Path) -> Path:
    """Copy a ``.pub`` file into a trust store after checking it parses; returns the stored path. Trusting the
    same key again is a no-op; a different key under a trusted (or revoked) id is refused."""
    public_file = Path(public_file)
    store_dir = Path(store_dir)
    text = public_file.read_text(errors="replace")
    if "PRIVATE KEY" in text:  # the .key beside the .pub: it must never leave the cloud
        raise KeyStoreError(f"{public_file} is a private key (it stays in the cloud); trust its public half, "
                            f"{public_file.with_suffix('.pub')}")  # fmt: skip
    store = TrustStore.load(store_dir) if store_dir.is_dir() else TrustStore()
    store.add(public_file.stem, text)  # validates; refuses replacing or revoked keys
    target = store_dir / f"{public_file.stem}.pub"  # the store reads *.pub: a key copied under another suffix is lost
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.is_file() or target.read_text() != public_file.read_text():
        write_atomic(target, public_file.read_text())
    return target


# -------------------------------------------------------------------------------------------- envelope
def _signed_bytes(msg) -> bytes:
    return wire.encode(dataclasses.replace(msg, signature=np.zeros(0, np.uint8)))


def seal(payload: bytes, *, robot_id: str, version: int, base_version: int, keyframe: bool, codec: str,
         num_params: int, signer: Signer, stamp_ns: int = 0, base_fingerprint: str = ""):  # fmt: skip
    """Wrap a codec payload into a signed ``WeightDelta`` message.

    ``base_fingerprint``: :func:`cdcca.fingerprint.student_fingerprint` of the base student the delta was computed
    on; it is signed with the rest, and a robot on other weights rejects the delta. Empty: not stated (the robot
    accepts it with a warning, as from a cloud older than the field)."""
    msg = wire.new(
        wire.WEIGHT_DELTA, header=wire.header(stamp_ns), robot_id=robot_id, version=version,
        base_version=base_version, keyframe=keyframe, codec=codec, num_params=num_params,
        base_fingerprint=base_fingerprint,
        sha256=np.frombuffer(hashlib.sha256(payload).digest(), np.uint8).copy(), key_id=signer.key_id,
        payload=np.frombuffer(payload, np.uint8).copy(),
    )  # fmt: skip
    msg.signature = np.frombuffer(signer.sign(_signed_bytes(msg)), np.uint8).copy()
    return msg


def check_fingerprint(msg, base_fingerprint: str) -> None:
    """DeltaRejected when the delta names a base student other than this robot's (``base_fingerprint``).

    A delta without a fingerprint (a cloud older than the field) is accepted with a warning, as is any delta on a
    robot that does not know its own (an empty ``base_fingerprint``): the other checks (names, shapes, counts)
    still apply, and refusing would strand robots mid-upgrade of their cloud."""
    stated = str(getattr(msg, "base_fingerprint", ""))
    if stated and base_fingerprint and stated != base_fingerprint:
        raise DeltaRejected(f"base fingerprint mismatch: delta for {stated}, robot has {base_fingerprint}")
    if not stated and msg.robot_id not in _WARNED_NO_FINGERPRINT:  # once per robot: a fleet of old clouds is not news
        _WARNED_NO_FINGERPRINT.add(msg.robot_id)
        log.warning("delta v%s for robot %s states no base fingerprint (an older cloud?); accepted on its names and "
                    "shapes alone (said once)", msg.version, msg.robot_id)  # fmt: skip


_WARNED_NO_FINGERPRINT: set[str] = set()


Decoder = Callable[[bytes, str, Mapping[str, tuple[int, ...]]], Mapping[str, Any]]
"""``decode(payload, codec, reference)``: a strict decode of a DWC payload against the receiver's trainable set
(name -> shape); raises ``CodecError`` for anything malformed."""


def dwc_decode(payload: bytes, codec: str, reference: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The torch :class:`Decoder` (``cdcca.dwc``, imports torch): what :func:`open_envelope` uses by default."""
    from cdcca.dwc import get_codec

    return get_codec(codec).decode(payload, reference, strict=True)


def open_envelope(msg, *, trust: TrustStore, robot_id: str, current_version: int, expected: Mapping[str, Any],
                  newest_version: int | None = None, base_fingerprint: str = "",
                  decode: Decoder | None = None) -> dict[str, Any]:  # fmt: skip
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
        base_fingerprint: this robot's :func:`cdcca.fingerprint.student_fingerprint` (empty: unknown, not
            checked); see :func:`check_fingerprint`.
        decode: how the payload is decoded (a :class:`Decoder`): default :func:`dwc_decode` (torch tensors);
            a robot without torch passes ``cdcca.edge.adapter_state.numpy_decode`` (numpy arrays, the same values).
    """
    from cdcca.edge.np_delta import CodecError  # torch-free

    codec_errors: tuple[type[Exception], ...] = (CodecError,)
    if decode is None:
        from cdcca.dwc import CodecError as DwcCodecError

        decode, codec_errors = dwc_decode, (CodecError, DwcCodecError)

    if msg.robot_id != robot_id:
        raise DeltaRejected(f"delta addressed to robot {msg.robot_id!r}, this is {robot_id!r}")
    trust.verify(msg.key_id, bytes(msg.signature), _signed_bytes(msg))
    check_fingerprint(msg, base_fingerprint)  # after the signature: the field is only trusted once it is signed
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
        delta = decode(payload, msg.codec, reference)
    except codec_errors as err:
        raise DeltaRejected(f"cannot decode {msg.codec!r} payload: {err}") from err
    missing, extra = set(expected) - set(delta), set(delta) - set(expected)
    if missing or extra:
        raise DeltaRejected(f"delta tensors do not match the trainable set: missing {sorted(missing)[:3]}, "
                            f"unexpected {sorted(extra)[:3]}")  # fmt: skip
    # dtype and finiteness are the codec's guarantee (decode yields finite float32 or raises CodecError)
    for name, tensor in delta.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise DeltaRejected(f"{name}: shape {tuple(tensor.shape)} != {tuple(expected[name].shape)}")
    if sum(math.prod(tuple(t.shape)) for t in delta.values()) != msg.num_params:
        raise DeltaRejected(f"num_params {msg.num_params} does not match the payload")
    return delta


# ----------------------------------------------------------------------------------------------- chain
@dataclass
class VersionChain:
    """The cloud's view of one robot: the original base, what it published, what the robot applied.

    Keeps the parameters of the original base (version 0) and of every published version still needed: the
    robot's applied version (the base of the next incremental delta). Older ones are dropped. A version resent as a
    keyframe (:meth:`keyframe`) keeps an empty dict: what the robot holds at it is not known.
    """

    robot_id: str
    base: dict[str, torch.Tensor]
    published: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    latest: int = 0
    applied: int = 0
    base_fingerprint: str = ""  # cdcca.fingerprint.student_fingerprint of the base student; stated in every delta

    def record_applied(self, version: int) -> None:
        """Robot reported ``version`` as its current adapter (AdapterStatus APPLIED or ROLLED_BACK)."""
        self.applied = version
        self.published = {v: p for v, p in self.published.items() if v >= version}

    def make_delta(self, params: dict[str, torch.Tensor], codec_name, signer: Signer, stamp_ns: int = 0,
                   importance: dict[str, float] | None = None, round_start: int | None = None):  # fmt: skip
        """Publish ``params`` as the next version: incremental against the applied version when the cloud
        still holds it, else a keyframe against the original base. ``importance`` goes to the codec.

        ``codec_name``: a registered codec's name or a codec. A round-bound codec (``SubspaceCodec``, whose round
        trained in its subspace from version ``round_start``) is used only when the delta is against that
        version; otherwise the change spans several rounds and goes as :data:`cdcca.dwc.SUBSPACE_FALLBACK`."""
        from cdcca.dwc import SUBSPACE_FALLBACK, apply_delta, compute_delta, get_codec

        version = self.latest + 1
        # a version resent as a keyframe is not known ({}): the delta goes against the base, which every robot holds
        reference = (self.published.get(self.applied) or None) if self.applied else None
        keyframe = reference is None
        base_params, base_version = (self.base, 0) if keyframe else (reference, self.applied)
        # laid out in the base's order, the robot's trainable set's, whatever order the reference came in (a version
        # read back from a store comes sorted by name): the robot checks the layout against its own set
        base_params = {name: base_params[name] for name in self.base if name in base_params} | base_params
        delta = compute_delta(params, base_params)
        codec = get_codec(codec_name) if isinstance(codec_name, str) else codec_name
        if getattr(codec, "round_bound", False) and round_start != base_version:
            codec = get_codec(SUBSPACE_FALLBACK)
        payload = codec.encode(delta, importance=importance)
        msg = seal(payload, robot_id=self.robot_id, version=version, base_version=base_version, keyframe=keyframe,
                   codec=codec.name, num_params=sum(t.numel() for t in delta.values()), signer=signer,
                   stamp_ns=stamp_ns, base_fingerprint=self.base_fingerprint)  # fmt: skip
        # remember what the robot will actually hold (lossy codecs), so the next incremental delta also
        # carries this round's compression error instead of letting it accumulate
        reference = {name: tuple(t.shape) for name, t in delta.items()}
        self.published[version] = apply_delta(base_params, codec.decode(payload, reference))
        self.latest = version
        return msg

    def keyframe(self, codec_name: str, signer: Signer, stamp_ns: int = 0):
        """The latest published version again, as a keyframe against the original base: what a robot that
        fell behind (missed a delta, or holds a version the cloud no longer keeps) can always apply.

        A lossy codec makes the keyframe's weights differ from the incremental delta's, and a robot's APPLIED does not
        say which of the two messages of this version it took. So the version's parameters are forgotten (an empty
        dict): the next delta goes against the original base, which both hold, and the cloud again knows exactly what
        the robot holds once it is applied. Without this, a robot that applied the keyframe would keep its
        quantization error for good, every later delta being computed against weights it does not have. Send the
        same message again on a later resend: a second call raises ``ValueError``."""
        from cdcca.dwc import SUBSPACE_FALLBACK, compute_delta, get_codec

        if self.latest == 0:
            raise ValueError(f"robot {self.robot_id}: nothing published yet")
        if not self.published.get(self.latest):
            raise ValueError(f"robot {self.robot_id}: v{self.latest} was sent as a keyframe already; send that again")
        delta = compute_delta(self.published[self.latest], self.base)
        codec = get_codec(codec_name)
        if getattr(codec, "round_bound", False):  # a keyframe spans every round so far: no one round's subspace
            codec = get_codec(SUBSPACE_FALLBACK)
        payload = codec.encode(delta)
        self.published[self.latest] = {}
        return seal(payload, robot_id=self.robot_id, version=self.latest, base_version=0, keyframe=True,
                    codec=codec.name, num_params=sum(t.numel() for t in delta.values()), signer=signer,
                    stamp_ns=stamp_ns, base_fingerprint=self.base_fingerprint)  # fmt: skip


# ------------------------------------------------------------------------------------------------ acks
ACK_CONTEXT = b"cdcca uts ack v1\n"  # domain separation: an ack's signature is never a delta's or a statement's
MAX_ACK_SEQUENCE = 2**63 - 1  # the robot persists the last accepted sequence in SQLite (signed 64-bit)


class AckRejected(CdccaError):
    """A ``UtsAck`` the robot refuses; ``reason`` is the counter it goes to (``unsigned``, ``unknown_key``,
    ``revoked_key``, ``bad_signature``, ``malformed``, ``foreign``, ``replayed``)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def ack_signed_bytes(robot_id: str, sequence: int, sample_ids: list[str]) -> bytes:
    """The canonical bytes an ack's signature covers: :data:`ACK_CONTEXT`, then the robot id, the sequence and
    the count of ids as little-endian uint64 (strings length-prefixed, UTF-8), then each id. Unambiguous: no two
    (robot, sequence, ids) share them."""

    def text(value: str) -> bytes:
        raw = value.encode("utf-8", "surrogatepass")
        return struct.pack("<Q", len(raw)) + raw

    return b"".join([ACK_CONTEXT, text(robot_id), struct.pack("<QQ", sequence, len(sample_ids)),
                     *(text(sample_id) for sample_id in sample_ids)])  # fmt: skip


def sign_ack(signer: Signer, robot_id: str, sample_ids: list[str], sequence: int, stamp_ns: int = 0):
    """A ``UtsAck`` of ``sample_ids`` for ``robot_id``, signed by the cloud's key; ``sequence`` must exceed that of
    every ack this cloud sent the robot before (the robot refuses anything not newer as a replay)."""
    if not 0 < sequence <= MAX_ACK_SEQUENCE:
        raise ValueError(f"ack sequence must be in 1..{MAX_ACK_SEQUENCE}, got {sequence}")
    ids = list(sample_ids)
    signature = signer.sign(ack_signed_bytes(robot_id, sequence, ids))
    return wire.new(wire.UTS_ACK, header=wire.header(stamp_ns), robot_id=robot_id, sample_ids=ids,
                    sequence=sequence, key_id=signer.key_id,
                    signature=np.frombuffer(signature, np.uint8).copy())  # fmt: skip


def verify_ack(msg, *, trust: TrustStore | None, robot_id: str) -> tuple[int, list[str]]:
    """Every check of a ``UtsAck`` but the replay check (which the uplink queue makes in the transaction that
    deletes): returns (sequence, sample ids) or raises :class:`AckRejected`."""
    if msg.robot_id != robot_id:
        raise AckRejected("foreign", f"ack addressed to robot {msg.robot_id!r}, this is {robot_id!r}")
    signature = bytes(np.asarray(msg.signature, np.uint8))
    if not msg.key_id and not signature:
        raise AckRejected("unsigned", "the ack carries no key id and no signature")
    sequence = int(msg.sequence)
    if not 0 < sequence <= MAX_ACK_SEQUENCE or len(signature) != 64:
        raise AckRejected("malformed", f"sequence {sequence}, signature of {len(signature)} bytes (64 expected)")
    if trust is None:
        raise AckRejected("unknown_key", "this robot has no trust store")
    ids = list(msg.sample_ids)
    try:
        data = ack_signed_bytes(msg.robot_id, sequence, ids)
    except UnicodeEncodeError as err:  # a decoded message holds valid UTF-8; a hand-built one might not
        raise AckRejected("malformed", str(err)) from None
    try:
        trust.verify(msg.key_id, signature, data)
    except DeltaRejected as err:  # verify refreshed the store: it tells why
        reason = ("revoked_key" if msg.key_id in trust.revoked
                  else "unknown_key" if msg.key_id not in trust.keys else "bad_signature")  # fmt: skip
        raise AckRejected(reason, err.reason) from None
    return sequence, ids
