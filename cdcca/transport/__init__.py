"""The robot <-> cloud link over Zenoh (eclipse-zenoh).

Key expressions are ``<robot_id>/cdcca/<topic>`` and payloads are the CDR bytes of :mod:`cdcca.wire`:
exactly what ``zenoh-bridge-ros2dds --namespace /<robot_id>`` publishes for the ROS 2 topic
``/cdcca/<topic>`` of a robot running the ROS nodes, so the cloud cannot tell a ROS robot behind the bridge
from a robot that talks Zenoh directly (zenoh-plugin-ros2dds: a ROS topic ``/ns/t`` maps to the key ``ns/t``
and carries the DDS sample's serialized CDR).

Topics and directions:

=================  ==============  ================================================================
topic              direction       message
=================  ==============  ================================================================
``uts_tokens``     robot -> cloud  ``cdcca_msgs/UtsTokens`` (uncertain samples, kept visual tokens)
``uts_ack``        cloud -> robot  ``cdcca_msgs/UtsAck`` (samples the cloud stored durably; signed, sequenced)
``weight_delta``   cloud -> robot  ``cdcca_msgs/WeightDelta`` (signed, versioned adapter update)
``adapter_status`` robot -> cloud  ``cdcca_msgs/AdapterStatus`` (after each delta, and as a heartbeat)
``answer``         robot -> any    ``cdcca_msgs/Answer`` (every answer, for monitoring)
=================  ==============  ================================================================

The embedded default is peer mode on loopback with multicast scouting off: the cloud listens on
``tcp/127.0.0.1:7447`` and robots connect to it. A router endpoint, TLS (certificates from files) and
user/password authentication are configuration (:class:`LinkConfig`), as in Zenoh's own configuration
reference (``transport/link/tls``, ``transport/auth/usrpwd``).

A robot is bound to its keys by Zenoh's access control (``LinkConfig.bind_robot_users``, Zenoh manual,
"Access Control"): on the process that listens (the cloud, or a router), every user ``robot-<id>`` of the users
file may put only the robot topics (:data:`ROBOT_TOPICS`) of robot ``<id>``, and is sent only the keys of robot
``<id>``. One robot's credentials can then neither upload nor report a status as another robot, nor read another
robot's deltas. Every other user of the file (cloud workers, monitors) is unrestricted.

Presence: the cloud declares a Zenoh liveliness token (:meth:`Link.declare_presence`, key
``cdcca/presence/<name>``); a robot subscribes to them (:meth:`Link.watch_presence`) and so learns within the
transport's lease whether any cloud is up, without waiting for a message (Zenoh's liveliness API: a token lives
as long as its session, and a subscriber with ``history`` is told of the tokens that already exist).

Congestion: Zenoh's default for a put is to drop it when the transport's queue is full. The cloud's messages
(``weight_delta``, ``uts_ack``) are published with ``CongestionControl.BLOCK`` instead: they are rare, a delta is
megabytes that would otherwise be dropped whole on a busy link, and losing one costs a resend period. The robot's
messages keep the default: its uploads are resent from the durable queue and its statuses repeat as heartbeats,
and a robot must not stall behind a congested link (Zenoh's ``CongestionControl`` reference).

Starting before the router: a Zenoh session in client mode opens only once it reaches a router (``zenoh.open``
fails at once otherwise), while a peer retries its endpoints in the background. A robot that boots before the network
or the cloud's router is up must still answer, so ``Link(config, connect_later=True)`` (what ``cdcca edge`` and
``cdcca cloud`` use) opens a client whose router cannot be reached yet in the background: it retries every 0.5 s,
doubling up to :data:`CONNECT_RETRY_MAX_S`, keeps the subscriptions and presence declared meanwhile and declares them
on the session once it opens; until then a put raises :class:`LinkNotConnected` (the robot's uploads stay queued).

Malformed bytes never reach the caller: a payload that does not decode as its topic's type, or whose
``robot_id`` disagrees with its key, is logged and counted in :attr:`Link.rejected` and dropped.
"""

from __future__ import annotations

import atexit
import json
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from cdcca import wire
from cdcca.errors import CdccaError
from cdcca.wire.topics import LINK_TOPICS

log = logging.getLogger(__name__)

TOPICS = LINK_TOPICS
DEFAULT_ENDPOINT = "tcp/127.0.0.1:7447"
PRESENCE_PREFIX = "cdcca/presence"  # liveliness tokens: cdcca/presence/<name>, e.g. cdcca/presence/cloud
ROBOT_TOPICS = ("uts_tokens", "adapter_status", "answer", "diagnostics")  # what a robot puts on the link
ROBOT_USER_PREFIX = "robot-"  # user robot-<id> of a users file is robot <id> (LinkConfig.bind_robot_users)
# every message kind of Zenoh 1.x's access control (zenoh-config AclMessage)
_ACL_MESSAGES = ("put", "delete", "declare_subscriber", "query", "declare_queryable", "reply", "liveliness_token",
                 "declare_liveliness_subscriber", "liveliness_query")  # fmt: skip
CLOUD_PRESENCE = "cloud"  # the name a cloud worker declares (several workers: cloud/<worker>)
BLOCKING_TOPICS = frozenset({"weight_delta", "uts_ack"})  # put with CongestionControl.BLOCK (see the module doc)
CONNECT_RETRY_S = 0.5  # a client whose router cannot be reached yet tries again after this, doubling ...
CONNECT_RETRY_MAX_S = 10.0  # ... up to this
CONNECT_WARN_EVERY_S = 60.0  # while it fails, a warning this often (a wrong password fails as a router that is down)


class LinkError(CdccaError, ValueError):
    """The link cannot be configured or opened (bad configuration, unreadable certificate, port in use)."""


class LinkNotConnected(LinkError):
    """A put on a client link that has not reached its router yet (``Link(..., connect_later=True)``)."""


def key(robot_id: str, topic: str) -> str:
    """The Zenoh key of ``topic`` for ``robot_id`` (``*`` matches every robot)."""
    if topic not in TOPICS:
        raise LinkError(f"unknown topic {topic!r}; topics: {', '.join(TOPICS)}")
    if not robot_id or any(c in robot_id for c in "/?#$") or (robot_id != "*" and "*" in robot_id):
        raise LinkError(f"robot id {robot_id!r} must be non-empty and free of / ? # $ *")
    return f"{robot_id}/cdcca/{topic}"


@dataclass
class LinkConfig:
    """How a process joins the Zenoh network.

    Args:
        mode: ``peer`` (default), ``client`` (through a router) or ``router`` (route for clients).
        listen: endpoints to listen on, e.g. ``["tcp/127.0.0.1:7447"]`` or ``["tls/0.0.0.0:7447"]``.
        connect: endpoints to connect to (a peer that listens, or a router).
        multicast_scouting: discover peers by UDP multicast (off by default: deterministic on loopback).
        tls_root_ca: CA certificate (PEM) that peers' certificates must chain to.
        tls_certificate: this process's certificate (PEM) when it listens on ``tls/`` or uses mutual TLS.
        tls_private_key: the key of ``tls_certificate`` (PEM, PKCS#8).
        tls_mutual: require and present client certificates (mTLS).
        username: user name for Zenoh's user/password authentication.
        password: its password.
        users_file: on the listening side, a file of ``user:password`` lines that are accepted.
        bind_robot_users: on the listening side (with ``users_file``), Zenoh access control that lets each user
            ``robot-<id>`` put only robot ``<id>``'s robot topics and receive only robot ``<id>``'s keys; other
            users are unrestricted (:meth:`access_control`).
    """

    _FLAGS: ClassVar[tuple[str, ...]] = ("multicast_scouting", "tls_mutual", "bind_robot_users")
    mode: str = "peer"
    listen: list[str] = field(default_factory=list)
    connect: list[str] = field(default_factory=list)
    multicast_scouting: bool = False
    tls_root_ca: str | None = None
    tls_certificate: str | None = None
    tls_private_key: str | None = None
    tls_mutual: bool = False
    username: str | None = None
    password: str | None = None
    users_file: str | None = None
    bind_robot_users: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("peer", "client", "router"):
            raise LinkError(f"LinkConfig.mode must be peer, client or router, got {self.mode!r}")
        for name in ("tls_root_ca", "tls_certificate", "tls_private_key", "users_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise LinkError(f"LinkConfig.{name}: no such file {path}")
        if (self.username is None) != (self.password is None):
            raise LinkError("LinkConfig: username and password go together")
        uses_tls = any(e.startswith("tls/") for e in [*self.listen, *self.connect])
        if uses_tls and self.tls_root_ca is None:
            raise LinkError("tls/ endpoints need LinkConfig.tls_root_ca (the CA certificate peers chain to)")
        if any(e.startswith("tls/") for e in self.listen) and not (self.tls_certificate and self.tls_private_key):
            raise LinkError("listening on tls/ needs LinkConfig.tls_certificate and tls_private_key")
        if self.bind_robot_users:
            self.access_control()  # a users file it cannot bind is an error now, not when the link opens

    def users(self) -> list[str]:
        """The user names of ``users_file``: one ``user:password`` per line, nothing else (Zenoh's usrpwd
        dictionary refuses blank lines and comments too)."""
        if self.users_file is None:
            return []
        names = []
        for number, line in enumerate(Path(self.users_file).read_text().splitlines(), 1):
            name, colon, _ = line.partition(":")
            if not colon or not name:
                raise LinkError(f"{self.users_file}:{number}: expected user:password")
            names.append(name)
        return names

    def access_control(self) -> dict:
        """The Zenoh ``access_control`` block of ``bind_robot_users``: default deny; users ``robot-<id>`` may put
        and delete only ``<id>/cdcca/<t>`` for the robot topics ``t``, are sent puts only on ``<id>/cdcca/**``, and
        may do everything else (subscribe, liveliness); the file's other users may do everything. Paste it into a
        ``zenohd`` configuration to bind robots at a router."""
        if self.users_file is None:
            raise LinkError("LinkConfig.bind_robot_users needs users_file (the user:password lines robots log in with)")
        users, robots = self.users(), {}
        for name in users:
            if name.startswith(ROBOT_USER_PREFIX):
                robot_id = name[len(ROBOT_USER_PREFIX) :]
                if "*" in robot_id:
                    raise LinkError(f"{self.users_file}: user {name!r} names no single robot (no * in a robot id)")
                key(robot_id, ROBOT_TOPICS[0])  # the same robot id check as every key
                robots[name] = robot_id
        others = [name for name in users if name not in robots]
        both = ["ingress", "egress"]
        reads = [m for m in _ACL_MESSAGES if m not in ("put", "delete")]
        rules = [{"id": "everything", "permission": "allow", "flows": both, "messages": list(_ACL_MESSAGES),
                  "key_exprs": ["**"]},
                 {"id": "no-writes", "permission": "allow", "flows": both, "messages": reads, "key_exprs": ["**"]}]
        subjects, policies = [], []
        if others:
            subjects.append({"id": "unbound", "usernames": others})
            policies.append({"rules": ["everything"], "subjects": ["unbound"]})
        for name, robot_id in robots.items():
            rules += [{"id": f"puts-of-{robot_id}", "permission": "allow", "flows": ["ingress"],
                       "messages": ["put", "delete"], "key_exprs": [key(robot_id, t) for t in ROBOT_TOPICS]},
                      {"id": f"keys-of-{robot_id}", "permission": "allow", "flows": ["egress"],
                       "messages": ["put", "delete"], "key_exprs": [f"{robot_id}/cdcca/**"]}]
            subjects.append({"id": f"user-{name}", "usernames": [name]})
            policies.append({"rules": ["no-writes", f"puts-of-{robot_id}", f"keys-of-{robot_id}"],
                             "subjects": [f"user-{name}"]})
        return {"enabled": True, "default_permission": "deny", "rules": rules, "subjects": subjects,
                "policies": policies}  # fmt: skip

    @classmethod
    def from_file(cls, path: str | Path) -> LinkConfig:
        """Read a JSON file whose keys are this class's fields."""
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8
            raise LinkError(f"cannot read link configuration {path}: {err}") from err
        if not isinstance(raw, dict):
            raise LinkError(f"{path}: a link configuration is a JSON object of {sorted(cls.__dataclass_fields__)}, "
                            f"got {type(raw).__name__}")  # fmt: skip
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise LinkError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        for name, value in raw.items():  # the types zenoh wants, checked here where the file can be named
            if name in ("listen", "connect"):
                ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
                kind = "a list of endpoint strings"
            elif name in cls._FLAGS:
                ok, kind = isinstance(value, bool), "true or false"
            else:
                ok, kind = value is None or isinstance(value, str), "a string"
            if not ok:
                raise LinkError(f"{path}: {name!r} must be {kind}, got {json.dumps(value)}")
        return cls(**raw)

    @classmethod
    def loopback(cls, listen: bool, endpoint: str = DEFAULT_ENDPOINT) -> LinkConfig:
        """The embedded default: the cloud listens on ``endpoint``; every other process connects to it and
        listens on an ephemeral loopback port, so gossip scouting meshes all peers (a robot's answers reach
        a monitor directly, not only the cloud)."""
        return cls(listen=[endpoint]) if listen else cls(listen=["tcp/127.0.0.1:0"], connect=[endpoint])

    def to_zenoh(self):
        """The ``zenoh.Config`` of this configuration."""
        import zenoh

        config = zenoh.Config()
        settings: dict[str, Any] = {
            "mode": self.mode,
            "scouting/multicast/enabled": self.multicast_scouting,
            "listen/endpoints": self.listen,
            "connect/endpoints": self.connect,
        }
        tls = "transport/link/tls/"
        if self.tls_root_ca:
            settings[tls + "root_ca_certificate"] = self.tls_root_ca
        if self.tls_certificate:
            settings[tls + "listen_certificate"] = self.tls_certificate
            settings[tls + "listen_private_key"] = self.tls_private_key
            if self.tls_mutual:
                settings[tls + "connect_certificate"] = self.tls_certificate
                settings[tls + "connect_private_key"] = self.tls_private_key
        if self.tls_mutual:
            settings[tls + "enable_mtls"] = True
        if self.username is not None:
            settings["transport/auth/usrpwd/user"] = self.username
            settings["transport/auth/usrpwd/password"] = self.password
        if self.users_file:
            settings["transport/auth/usrpwd/dictionary_file"] = self.users_file
        if self.bind_robot_users:
            settings["access_control"] = self.access_control()
        try:
            for name, value in settings.items():
                config.insert_json5(name, json.dumps(value))
        except Exception as err:  # zenoh raises its own ZError
            raise LinkError(f"invalid Zenoh setting: {err}") from err
        return config

    def as_dict(self) -> dict:
        return asdict(self)


def without_rust_paths(text: str) -> str:
    """A Zenoh error's text without the Rust source paths it carries (``... at /root/.cargo/.../x.rs:447.``)."""
    return re.sub(r"\s*at /\S+\.rs:\d+\.?", "", text).strip()


Handler = Callable[[str, Any, bytes], None]  # (robot_id, decoded message, the CDR payload as received)


class Link:
    """One Zenoh session: publish messages, subscribe with decoding and rejection counting.

    Args:
        config: how to join the network.
        blocking: the topics whose puts block rather than drop when the link is congested (default
            :data:`BLOCKING_TOPICS`).
        connect_later: in client mode, a router that cannot be reached yet is not an error: the session opens in the
            background once it can (see the module doc); :attr:`connected` says whether it has.
    """

    def __init__(self, config: LinkConfig, blocking: frozenset[str] | set[str] = BLOCKING_TOPICS,
                 connect_later: bool = False) -> None:  # fmt: skip
        import zenoh

        self.config = config
        self.blocking = frozenset(blocking)
        self._block, self._drop = zenoh.CongestionControl.BLOCK, zenoh.CongestionControl.DROP
        self._publishers: dict[str, Any] = {}
        self._probes: dict[str, Any] = {}  # publishers that only report whether a remote subscriber matches (matched)
        self._subscribers: list[Any] = []
        self._tokens: list[Any] = []
        self._declare_later: list[Callable[[], None]] = []  # what was declared before the session opened
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._connector: threading.Thread | None = None
        self.rejected: Counter[str] = Counter()  # topic -> malformed payloads dropped
        self.sent_bytes: Counter[str] = Counter()
        self.received_bytes: Counter[str] = Counter()
        self.connect_failures = 0  # failed tries to reach the router in the background
        self.closed = False
        self.session: Any = None
        try:
            self.session = zenoh.open(config.to_zenoh())
        except Exception as err:
            if not (connect_later and config.mode == "client"):
                raise LinkError(f"cannot open the Zenoh session ({err}); check endpoints and certificates") from err
            log.warning("no Zenoh router reachable at %s yet (%s); connecting in the background",
                        ", ".join(config.connect) or "the scouted routers", without_rust_paths(str(err)))  # fmt: skip
            self._connector = threading.Thread(target=self._connect, name="zenoh-connect", daemon=True)
            self._connector.start()
        atexit.register(self.close)  # an open Zenoh session keeps the interpreter from exiting

    @property
    def connected(self) -> bool:
        """Whether the Zenoh session is open (always, but for a client still looking for its router)."""
        return self.session is not None

    def _connect(self) -> None:
        """Open the client session once its router can be reached, then declare what was declared meanwhile."""
        import zenoh

        wait, warned = CONNECT_RETRY_S, time.monotonic()
        while not self._stop.wait(wait):
            try:
                session = zenoh.open(self.config.to_zenoh())
            except Exception as err:
                self.connect_failures += 1
                if time.monotonic() - warned >= CONNECT_WARN_EVERY_S:
                    warned = time.monotonic()
                    log.warning("still no Zenoh router at %s after %d tries (%s); check that it runs and the link's "
                                "credentials and certificates", ", ".join(self.config.connect) or "the scouted routers",
                                self.connect_failures, without_rust_paths(str(err)))  # fmt: skip
                else:
                    log.debug("Zenoh router still unreachable: %s", without_rust_paths(str(err)))
                wait = min(2 * wait, CONNECT_RETRY_MAX_S)
                continue
            with self._lock:
                if self.closed:
                    session.close()
                    return
                self.session, later = session, self._declare_later
                self._declare_later = []
            log.info("connected to the Zenoh router after %d failed tries", self.connect_failures)
            for declare in later:
                try:
                    declare()
                except Exception:  # one bad declaration must not keep the others back
                    log.exception("declaring on the Zenoh session failed")
            return

    def _declare(self, declare: Callable[[], None]) -> None:
        """Run ``declare`` on the session now, or once it opens."""
        with self._lock:
            if self.session is None:
                self._declare_later.append(declare)
                return
        declare()

    def publish(self, robot_id: str, topic: str, msg: Any) -> int:
        """Encode ``msg`` and put it on ``<robot_id>/cdcca/<topic>``; returns the payload size in bytes."""
        if getattr(msg, "__msgtype__", None) != TOPICS[topic]:
            raise LinkError(f"topic {topic!r} carries {TOPICS[topic]}, got {getattr(msg, '__msgtype__', msg)!r}")
        return self.publish_bytes(robot_id, topic, wire.encode(msg))

    def publish_bytes(self, robot_id: str, topic: str, data: bytes) -> int:
        """Put already encoded CDR bytes (e.g. from a durable queue) on the topic's key."""
        name = key(robot_id, topic)
        with self._lock:
            if self.closed:
                raise LinkError("the link is closed")
            if self.session is None:
                where = ", ".join(self.config.connect) or "the scouted routers"
                raise LinkNotConnected(f"not connected: no Zenoh router reached yet at {where}")
            publisher = self._publishers.get(name)
            if publisher is None:
                congestion = self._block if topic in self.blocking else self._drop
                publisher = self._publishers[name] = self.session.declare_publisher(name, congestion_control=congestion)
            publisher.put(data)
            self.sent_bytes[topic] += len(data)
        return len(data)

    def matched(self, robot_id: str, topic: str) -> bool:
        """Whether a subscriber in another session this one reaches matches ``<robot_id>/cdcca/<topic>`` now. Zenoh
        delivers a put to the subscribers it knows of, so a put made before a new remote subscriber's declaration
        arrived is not seen by it: wait on this before the first put where that matters. Subscribers of this
        session do not count (they hear its puts at once, and would make it true before any remote one is known):
        the matching status of a publisher whose puts may only leave the session
        (``allowed_destination=Locality.REMOTE``; https://zenoh.io/docs/manual/abstractions/), declared once per key
        and never put on. False while not connected."""
        import zenoh

        name = key(robot_id, topic)
        with self._lock:
            if self.closed or self.session is None:
                return False
            probe = self._probes.get(name)
            if probe is None:
                probe = self._probes[name] = self.session.declare_publisher(
                    name, allowed_destination=zenoh.Locality.REMOTE)  # fmt: skip
            return bool(probe.matching_status.matching)

    def subscribe(self, robot_id: str, topic: str, handler: Handler) -> None:
        """Call ``handler(robot_id, msg, data)`` for every valid message on the topic (``robot_id="*"``: all
        robots). Runs on a Zenoh thread; keep the handler short. Exceptions in the handler are logged."""
        expected = TOPICS[topic]

        def on_sample(sample) -> None:
            data = sample.payload.to_bytes()
            sender = str(sample.key_expr).split("/", 1)[0]
            try:
                msg = wire.decode(expected, data)
            except wire.WireError as err:
                self._reject(topic, sender, str(err))
                return
            claimed = getattr(msg, "robot_id", sender)
            if claimed != sender:
                self._reject(topic, sender, f"message says robot_id {claimed!r} but arrived on {sender!r}'s key")
                return
            self.received_bytes[topic] += len(data)
            try:
                handler(sender, msg, data)
            except Exception:  # a handler bug must not kill Zenoh's thread; it is visible in the log
                log.exception("handler of %s failed", sample.key_expr)
                self.rejected[f"{topic}:handler_error"] += 1

        name = key(robot_id, topic)
        self._declare(lambda: self._subscribers.append(self.session.declare_subscriber(name, on_sample)))

    def _reject(self, topic: str, sender: str, reason: str) -> None:
        self.rejected[topic] += 1
        log.warning("rejected a %s payload from %r: %s", topic, sender, reason)

    def declare_presence(self, name: str = CLOUD_PRESENCE) -> None:
        """Declare that this process (e.g. the cloud: ``cloud``, or ``cloud/<worker>``) is up, as a liveliness token
        on ``cdcca/presence/<name>``; it goes away with the session (closed, crashed or cut off)."""
        if not name or any(c in name for c in "?#$*") or name.startswith("/") or name.endswith("/"):
            raise LinkError(f"presence name {name!r} must be key chunks separated by / (no ? # $ *)")
        self._declare(lambda: self._tokens.append(self.session.liveliness().declare_token(f"{PRESENCE_PREFIX}/{name}")))

    def watch_presence(self, name: str, on_change: Callable[[str, bool], None]) -> None:
        """Call ``on_change(name, alive)`` whenever a presence token under ``name`` (``cloud`` also matches
        ``cloud/<worker>``) appears or disappears, starting with those that exist now."""
        import zenoh

        prefix = f"{PRESENCE_PREFIX}/"

        def on_sample(sample) -> None:
            try:
                on_change(str(sample.key_expr)[len(prefix) :], sample.kind == zenoh.SampleKind.PUT)
            except Exception:  # a handler bug must not kill Zenoh's thread
                log.exception("presence handler failed")

        self._declare(lambda: self._subscribers.append(
            self.session.liveliness().declare_subscriber(f"{prefix}{name}/**", on_sample, history=True)))  # fmt: skip

    def peers(self) -> int:
        """Zenoh sessions this one is connected to (peers and routers)."""
        if self.session is None:
            return 0
        info = self.session.info
        return len(list(info.peers_zid())) + len(list(info.routers_zid()))

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
        self._stop.set()
        atexit.unregister(self.close)
        if self.session is None:  # still looking for the router: it gives up at its next wake-up
            return
        for token in self._tokens:
            token.undeclare()
        for subscriber in self._subscribers:
            subscriber.undeclare()
        self.session.close()

    def __enter__(self) -> Link:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
