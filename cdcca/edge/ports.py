"""Ports of the edge runtime that need no middleware of their own: the Zenoh link, and a fan-out of several.

A port is ``publish(topic, cdr_bytes)`` (see :class:`~cdcca.edge.runtime.Port`); one that also has
``attach(runtime)`` hands what arrives to the runtime's ``on_*`` handlers. The rclpy port lives in the
``cdcca_edge`` node, the raw DDS one in :mod:`cdcca.edge.dds_port`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cdcca.wire.topics import LINK_TOPICS

if TYPE_CHECKING:
    from cdcca.edge.runtime import EdgeRuntime
    from cdcca.transport import Link


class ZenohPort:
    """The robot's side of the Zenoh link: keys ``<robot_id>/cdcca/<topic>``, payloads unchanged CDR.

    Args:
        link: an open :class:`~cdcca.transport.Link`.
        robot_id: this robot (the key prefix it publishes under and listens on).
    """

    topics = frozenset(LINK_TOPICS)

    def __init__(self, link: Link, robot_id: str) -> None:
        self.link, self.robot_id = link, robot_id

    @property
    def rejected(self) -> Any:
        """Malformed payloads the link dropped, per topic."""
        return self.link.rejected

    @property
    def connected(self) -> bool:
        """Whether the link has reached the network (a client may still be looking for its router)."""
        return self.link.connected

    @property
    def connect_failures(self) -> int:
        return self.link.connect_failures

    def publish(self, topic: str, data: bytes) -> None:
        self.link.publish_bytes(self.robot_id, topic, data)

    def attach(self, runtime: EdgeRuntime) -> None:
        """Deltas and acks addressed to this robot go to the runtime (the link has decoded and checked them)."""
        self.link.subscribe(self.robot_id, "weight_delta", lambda _, msg, __: runtime.on_weight_delta(msg))
        self.link.subscribe(self.robot_id, "uts_ack", lambda _, msg, __: runtime.on_ack(msg))


class FanOut:
    """Several ports as one: each topic goes to every port whose ``topics`` hold it (e.g. the loop over Zenoh
    and the answers on a ROS graph too).

    Args:
        ports: ports with a ``topics`` set.
    """

    def __init__(self, *ports: Any) -> None:
        self.ports = ports
        self.topics = frozenset().union(*(port.topics for port in ports))

    @property
    def rejected(self) -> Any:
        return next((port.rejected for port in self.ports if hasattr(port, "rejected")), None)

    @property
    def connected(self) -> bool:
        return all(getattr(port, "connected", True) for port in self.ports)

    @property
    def connect_failures(self) -> int:
        return sum(getattr(port, "connect_failures", 0) for port in self.ports)

    def publish(self, topic: str, data: bytes) -> None:
        """Publish on every port that carries ``topic``; one that refuses (a Zenoh link still looking for its router)
        does not keep the message from the others. The first refusal is raised once all were tried."""
        failed: Exception | None = None
        for port in self.ports:
            if topic in port.topics:
                try:
                    port.publish(topic, data)
                except Exception as err:
                    failed = failed or err
        if failed is not None:
            raise failed

    def attach(self, runtime: EdgeRuntime) -> None:
        for port in self.ports:
            if hasattr(port, "attach"):
                port.attach(runtime)
