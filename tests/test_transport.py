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
from cdcca.transport import Link, LinkConfig, LinkError, key


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
    assert wait_until(lambda: cloud.peers() >= 1)
    time.sleep(0.3)  # let the subscription propagate
    sent = robot.publish("r1", "adapter_status", status(version=7))
    robot.publish_bytes("r1", "adapter_status", b"\x00\x01\x00\x00garbage")  # malformed CDR
    robot.publish("r2", "adapter_status", status("r1", 8))  # robot id disagrees with the key
    robot.publish("r2", "adapter_status", status("r2", 9))
    assert wait_until(lambda: len(got) == 2 and cloud.rejected["adapter_status"] == 2)
    assert got == [("r1", 7, sent), ("r2", 9, sent)]
    assert sent == len(wire.encode(status(version=7)))
    with pytest.raises(LinkError, match="carries"):
        robot.publish("r1", "uts_ack", status())


def test_a_failing_handler_is_counted_and_the_link_keeps_delivering(pair_of_links):
    cloud, robot = pair_of_links
    got = []

    def handler(robot_id, msg, data):
        if msg.version == 1:
            raise RuntimeError("bug")
        got.append(msg.version)

    cloud.subscribe("r1", "adapter_status", handler)
    assert wait_until(lambda: cloud.peers() >= 1)
    time.sleep(0.3)
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
        assert wait_until(lambda: robot.peers() == 1)
        time.sleep(0.3)
        robot.publish("r1", "adapter_status", status(version=3))
        intruder.publish("r1", "adapter_status", status(version=66))
        assert wait_until(lambda: got == [3])
        time.sleep(0.3)
        assert got == [3]  # the wrong password never got a session
        assert intruder.peers() == 0
    finally:
        for link in (intruder, robot, cloud):
            link.close()


def test_through_a_router_in_client_mode():
    endpoint = f"tcp/127.0.0.1:{free_port()}"
    router = Link(LinkConfig(mode="router", listen=[endpoint]))
    robot = Link(LinkConfig(mode="client", connect=[endpoint]))
    monitor = Link(LinkConfig(mode="client", connect=[endpoint]))
    try:
        got = []
        monitor.subscribe("r1", "adapter_status", lambda robot_id, msg, _: got.append(msg.version))
        assert wait_until(lambda: robot.peers() == 1 and monitor.peers() == 1)
        time.sleep(0.3)
        robot.publish("r1", "adapter_status", status(version=5))
        assert wait_until(lambda: got == [5])  # client -> router -> client
    finally:
        for link in (monitor, robot, router):
            link.close()
