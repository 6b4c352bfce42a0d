"""The Zenoh link on loopback: keys, CDR payloads, rejection of bad bytes, TLS and user/password auth."""

import datetime
import ipaddress
import socket
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cdcca import wire
from cdcca.transport import Link, LinkConfig, LinkError, LinkNotConnected, key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def status(robot_id="r1", version=1):
    return wire.new(wire.ADAPTER_STATUS, robot_id=robot_id, version=version)


@pytest.fixture()
def pair_of_links():
    endpoint = f"tcp/127.0.0.1:{free_port()}"
    cloud, robot = Link(LinkConfig.loopback(True, endpoint)), Link(LinkConfig.loopback(False, endpoint))
    yield cloud, robot
    robot.close()
    cloud.close()


def test_keys_follow_the_bridge_convention():
    # zenoh-bridge-ros2dds --namespace r1 maps ROS topic /cdcca/uts_tokens to key r1/cdcca/uts_tokens
    assert key("r1", "uts_tokens") == "r1/cdcca/uts_tokens"
    assert key("*", "adapter_status") == "*/cdcca/adapter_status"
    for bad in ("", "a/b", "r*1"):
        with pytest.raises(LinkError):
            key(bad, "answer")
    with pytest.raises(LinkError, match="unknown topic"):
        key("r1", "camera")


def test_messages_arrive_as_the_cdr_bytes_and_bad_payloads_are_counted(pair_of_links):
    cloud, robot = pair_of_links
    got = []
    cloud.subscribe("*", "adapter_status", lambda robot_id, msg, data: got.append((robot_id, msg.version, len(data))))
    assert wait_until(lambda: robot.matched("r1", "adapter_status") and robot.matched("r2", "adapter_status"))
    sent = robot.publish("r1", "adapter_status", status(version=7))
    robot.publish_bytes("r1", "adapter_status", b"\x00\x01\x00\x00garbage")  # malformed CDR
    robot.publish("r2", "adapter_status", status("r1", 8))  # robot id disagrees with the key
    robot.publish("r2", "adapter_status", status("r2", 9))
    assert wait_until(lambda: len(got) == 2 and cloud.rejected["adapter_status"] == 2)
    assert got == [("r1", 7, sent), ("r2", 9, sent)]
    assert sent == len(wire.encode(status(version=7)))
    with pytest.raises(LinkError, match="carries"):
        robot.publish("r1", "uts_ack", status())


def test_matched_says_when_a_subscriber_anywhere_would_receive_a_put(pair_of_links):
    cloud, robot = pair_of_links
    assert wait_until(lambda: robot.peers() >= 1)
    assert not robot.matched("r1", "adapter_status")  # nobody subscribes yet: a put now would be lost
    robot.subscribe("*", "adapter_status", lambda *_: None)
    time.sleep(0.3)
    assert not robot.matched("r2", "adapter_status")  # its own subscriber hears it at once: not what this asks
    cloud.subscribe("r2", "adapter_status", lambda *_: None)
    assert wait_until(lambda: robot.matched("r2", "adapter_status"))
    assert not robot.matched("r1", "adapter_status")  # another robot's key
    robot.close()
    assert not robot.matched("r2", "adapter_status")
    unconnected = Link(LinkConfig(mode="client", connect=[f"tcp/127.0.0.1:{free_port()}"]), connect_later=True)
    try:
        assert not unconnected.matched("r1", "adapter_status")
    finally:
        unconnected.close()


def test_a_failing_handler_is_counted_and_the_link_keeps_delivering(pair_of_links):
    cloud, robot = pair_of_links
    got = []

    def handler(robot_id, msg, data):
        if msg.version == 1:
            raise RuntimeError("bug")
        got.append(msg.version)

    cloud.subscribe("r1", "adapter_status", handler)
    assert wait_until(lambda: robot.matched("r1", "adapter_status"))
    robot.publish("r1", "adapter_status", status(version=1))
    robot.publish("r1", "adapter_status", status(version=2))
    assert wait_until(lambda: got == [2])
    assert cloud.rejected["adapter_status:handler_error"] == 1


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(LinkError, match="tls_root_ca"):
        LinkConfig(listen=["tls/127.0.0.1:7447"])
    with pytest.raises(LinkError, match="no such file"):
        LinkConfig(tls_root_ca=str(tmp_path / "missing.pem"))
    with pytest.raises(LinkError, match="username and password"):
        LinkConfig(username="robot")
    with pytest.raises(LinkError, match="mode"):
        LinkConfig(mode="mesh")
    path = tmp_path / "link.json"
    path.write_text('{"mode": "peer", "connect": ["tcp/127.0.0.1:1"], "colour": "red"}')
    with pytest.raises(LinkError, match="unknown keys"):
        LinkConfig.from_file(path)
    path.write_text('{"mode": "client", "connect": ["tcp/10.0.0.2:7447"]}')
    assert LinkConfig.from_file(path).connect == ["tcp/10.0.0.2:7447"]


def _certificates(directory):
    """A test CA and a server certificate for localhost, as PEM files."""
    now = datetime.datetime.now(datetime.timezone.utc)

    def build(subject, issuer, public_key, signing_key, extension, critical):
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1)).add_extension(extension, critical=critical)
                .sign(signing_key, hashes.SHA256()))  # fmt: skip

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cdcca test CA")])
    ca = build(ca_name, ca_name, ca_key.public_key(), ca_key, x509.BasicConstraints(ca=True, path_length=None), True)
    names = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    server = build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]), ca_name,
                   server_key.public_key(), ca_key, names, False)  # fmt: skip
    files = {"ca": directory / "ca.pem", "cert": directory / "cert.pem", "key": directory / "key.pem"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))  # fmt: skip
    return {name: str(path) for name, path in files.items()}


def test_tls_with_user_password_auth_on_loopback(tmp_path):
    files = _certificates(tmp_path)
    users = tmp_path / "users.txt"
    users.write_text("robot-r1:s3cret\ncloud:cloudpw\n")
    endpoint = f"tls/localhost:{free_port()}"
    cloud = Link(LinkConfig(listen=[endpoint], tls_root_ca=files["ca"], tls_certificate=files["cert"],
                            tls_private_key=files["key"], username="cloud", password="cloudpw",
                            users_file=str(users)))  # fmt: skip
    robot = Link(LinkConfig(connect=[endpoint], tls_root_ca=files["ca"], username="robot-r1", password="s3cret"))
    intruder = Link(LinkConfig(connect=[endpoint], tls_root_ca=files["ca"], username="robot-r1", password="guess"))
    try:
        got = []
        cloud.subscribe("*", "adapter_status", lambda robot_id, msg, _: got.append(msg.version))
        assert wait_until(lambda: robot.peers() == 1 and robot.matched("r1", "adapter_status"))
        robot.publish("r1", "adapter_status", status(version=3))
        intruder.publish("r1", "adapter_status", status(version=66))
        assert wait_until(lambda: got == [3])
        time.sleep(0.3)
        assert got == [3]  # the wrong password never got a session
        assert intruder.peers() == 0
    finally:
        for link in (intruder, robot, cloud):
            link.close()


def _users(tmp_path, text="robot-r1:pw1\nrobot-r2:pw2\ncloud:cpw\n"):
    users = tmp_path / "users.txt"
    users.write_text(text)
    return str(users)


def test_a_robot_user_puts_only_its_own_robot_topics_and_is_sent_only_its_own_keys(tmp_path):
    users = _users(tmp_path)
    endpoint = f"tcp/127.0.0.1:{free_port()}"
    cloud = Link(LinkConfig(listen=[endpoint], username="cloud", password="cpw", users_file=users,
                            bind_robot_users=True))  # fmt: skip
    r1 = Link(LinkConfig(connect=[endpoint], username="robot-r1", password="pw1"))
    r2 = Link(LinkConfig(connect=[endpoint], username="robot-r2", password="pw2"))
    try:
        heard, r1_heard, r2_heard = [], [], []
        cloud.subscribe("*", "adapter_status", lambda robot_id, msg, _: heard.append((robot_id, msg.version)))
        cloud.session.declare_subscriber("*/cdcca/weight_delta", lambda s: heard.append((str(s.key_expr), 0)))
        r1.subscribe("*", "adapter_status", lambda robot_id, msg, _: r1_heard.append(msg.version))
        r2.subscribe("*", "adapter_status", lambda robot_id, msg, _: r2_heard.append(msg.version))
        assert wait_until(lambda: r1.peers() == 1 and r2.peers() == 1)
        time.sleep(0.5)

        r1.publish("r1", "adapter_status", status("r1", version=1))  # its own
        r1.publish("r2", "adapter_status", status("r2", version=66))  # as another robot
        r1.publish_bytes("r1", "weight_delta", b"not a robot topic")
        r2.publish("r2", "adapter_status", status("r2", version=2))
        cloud.publish("r1", "adapter_status", status("r1", version=7))
        cloud.publish("r2", "adapter_status", status("r2", version=8))

        assert wait_until(lambda: {("r1", 1), ("r2", 2)} <= set(heard) and 7 in r1_heard and 8 in r2_heard)
        time.sleep(0.5)
        assert sorted(heard) == [("r1", 1), ("r1", 7), ("r2", 2), ("r2", 8)]  # its own, and nothing forged
        # a session hears its own puts locally; from the cloud, each robot is sent only its own robot's keys
        assert sorted(r1_heard) == [1, 7, 66] and sorted(r2_heard) == [2, 8]
    finally:
        for link in (r2, r1, cloud):
            link.close()


def test_a_router_binds_robot_users_for_its_clients(tmp_path):
    """The same access control on a router (robots and the cloud as its clients): a forged status is dropped at
    the router, and a robot is routed only its own robot's keys."""
    endpoint = f"tcp/127.0.0.1:{free_port()}"
    router = Link(LinkConfig(mode="router", listen=[endpoint], users_file=_users(tmp_path), bind_robot_users=True))
    cloud = Link(LinkConfig(mode="client", connect=[endpoint], username="cloud", password="cpw"))
    r1 = Link(LinkConfig(mode="client", connect=[endpoint], username="robot-r1", password="pw1"))
    r2 = Link(LinkConfig(mode="client", connect=[endpoint], username="robot-r2", password="pw2"))
    try:
        heard, r2_heard = [], []
        cloud.subscribe("*", "adapter_status", lambda robot_id, msg, _: heard.append((robot_id, msg.version)))
        r2.subscribe("*", "adapter_status", lambda robot_id, msg, _: r2_heard.append(msg.version))
        assert wait_until(lambda: all(link.peers() == 1 for link in (cloud, r1, r2)))
        time.sleep(0.5)
        r1.publish("r1", "adapter_status", status("r1", version=1))
        r1.publish("r2", "adapter_status", status("r2", version=66))  # as another robot
        cloud.publish("r2", "adapter_status", status("r2", version=8))
        cloud.publish("r1", "adapter_status", status("r1", version=7))
        assert wait_until(lambda: ("r1", 1) in heard and 8 in r2_heard)
        time.sleep(0.5)
        assert sorted(heard) == [("r1", 1), ("r1", 7), ("r2", 8)]  # r1's own, the cloud's own (local), no forgery
        assert r2_heard == [8]  # neither r1's forgery nor r1's key
    finally:
        for link in (r2, r1, cloud, router):
            link.close()


def test_binding_robot_users_reads_the_users_file_and_refuses_what_it_cannot_bind(tmp_path):
    config = LinkConfig(users_file=_users(tmp_path), bind_robot_users=True)
    acl = config.access_control()
    assert acl["default_permission"] == "deny" and config.users() == ["robot-r1", "robot-r2", "cloud"]
    assert {"id": "unbound", "usernames": ["cloud"]} in acl["subjects"]
    puts = {r["id"]: r["key_exprs"] for r in acl["rules"] if r["id"].startswith("puts-of-")}
    assert puts["puts-of-r1"] == ["r1/cdcca/uts_tokens", "r1/cdcca/adapter_status", "r1/cdcca/answer",
                                  "r1/cdcca/diagnostics"]  # fmt: skip
    with pytest.raises(LinkError, match="needs users_file"):
        LinkConfig(bind_robot_users=True)
    with pytest.raises(LinkError, match="no single robot"):
        LinkConfig(users_file=_users(tmp_path, "robot-*:pw\n"), bind_robot_users=True)
    for bad in ("robot-r1:pw\nrobot-r2\n", "robot-r1:pw\n# a comment\n"):  # Zenoh would refuse both files
        with pytest.raises(LinkError, match=r"users.txt:2: expected user:password"):
            LinkConfig(users_file=_users(tmp_path, bad), bind_robot_users=True)
    with pytest.raises(LinkError, match="must be non-empty"):
        LinkConfig(users_file=_users(tmp_path, "robot-a/b:pw\n"), bind_robot_users=True)


def test_through_a_router_in_client_mode():
    endpoint = f"tcp/127.0.0.1:{free_port()}"
    router = Link(LinkConfig(mode="router", listen=[endpoint]))
    robot = Link(LinkConfig(mode="client", connect=[endpoint]))
    monitor = Link(LinkConfig(mode="client", connect=[endpoint]))
    try:
        got = []
        monitor.subscribe("r1", "adapter_status", lambda robot_id, msg, _: got.append(msg.version))
        assert wait_until(lambda: robot.matched("r1", "adapter_status"))  # the monitor's subscription, via the router
        robot.publish("r1", "adapter_status", status(version=5))
        assert wait_until(lambda: got == [5])  # client -> router -> client
    finally:
        for link in (monitor, robot, router):
            link.close()


def test_a_client_started_before_its_router_connects_in_the_background_once_the_router_is_up(caplog):
    # Arrange: no router on the endpoint yet
    endpoint = f"tcp/127.0.0.1:{free_port()}"
    with pytest.raises(LinkError, match="cannot open the Zenoh session"):
        Link(LinkConfig(mode="client", connect=[endpoint]))  # asked to connect now: refused, as before
    robot = Link(LinkConfig(mode="client", connect=[endpoint]), connect_later=True)
    router = cloud = None
    try:
        got, present = [], []
        robot.subscribe("r1", "adapter_status", lambda robot_id, msg, _: got.append(msg.version))
        robot.watch_presence("cloud", lambda name, alive: present.append((name, alive)))
        assert not robot.connected and robot.peers() == 0
        with pytest.raises(LinkNotConnected, match="no Zenoh router reached yet"):
            robot.publish("r1", "adapter_status", status(version=1))
        assert "connecting in the background" in caplog.text and ".rs:" not in caplog.text
        # Act: the router and the cloud come up
        time.sleep(0.8)  # at least one failed try in the background
        router = Link(LinkConfig(mode="router", listen=[endpoint]))
        cloud = Link(LinkConfig(mode="client", connect=[endpoint]))
        cloud.declare_presence()
        heard = []
        cloud.subscribe("*", "adapter_status", lambda robot_id, msg, _: heard.append(msg.version))
        # Assert: the robot connects, and what it declared before works both ways
        assert wait_until(lambda: robot.connected and robot.peers() == 1, timeout=20)
        assert robot.connect_failures >= 1
        assert wait_until(lambda: present == [("cloud", True)])

        def both_ways() -> bool:  # a put before the other side's subscription reached the router is lost: again
            cloud.publish("r1", "adapter_status", status(version=7))
            robot.publish("r1", "adapter_status", status(version=8))
            time.sleep(0.1)
            return got[-1:] == [7] and heard[-1:] == [8]

        assert wait_until(both_ways, timeout=20)
    finally:
        robot.close()
        for link in (cloud, router):
            if link is not None:
                link.close()


def test_a_client_that_keeps_failing_to_connect_warns_again_with_the_count(monkeypatch, caplog):
    import cdcca.transport as transport

    monkeypatch.setattr(transport, "CONNECT_WARN_EVERY_S", 0.0)
    monkeypatch.setattr(transport, "CONNECT_RETRY_MAX_S", 0.5)
    robot = Link(LinkConfig(mode="client", connect=[f"tcp/127.0.0.1:{free_port()}"]), connect_later=True)
    try:
        assert wait_until(lambda: robot.connect_failures >= 2, timeout=10)
        assert "still no Zenoh router at" in caplog.text and "after 1 tries" in caplog.text
    finally:
        robot.close()


def test_a_client_still_looking_for_its_router_closes_at_once():
    robot = Link(LinkConfig(mode="client", connect=[f"tcp/127.0.0.1:{free_port()}"]), connect_later=True)
    started = time.monotonic()
    robot.close()
    robot._connector.join(timeout=5)
    assert not robot._connector.is_alive() and time.monotonic() - started < 5 and robot.session is None
    with pytest.raises(LinkError, match="closed"):
        robot.publish("r1", "adapter_status", status())
