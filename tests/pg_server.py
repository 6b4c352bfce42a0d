"""A real PostgreSQL server for the tests, started from Debian's package binaries and stopped at the session's end.

The server runs from a temporary folder, listens on 127.0.0.1 at a free port and on a unix socket in that folder,
trusts local connections, and runs without fsync (a test server: its data dies with the session). ``initdb``
refuses to run as root, so as root the server runs as the unprivileged user Debian's ``postgresql`` package
creates (``postgres``), through ``runuser``. Each test gets a database of its own (``CREATE DATABASE``, a few
hundred milliseconds), so no state leaks between tests.

Use it from a test module with ``from tests.pg_server import pg_server, pg_url  # noqa: F401`` (the fixtures).
A test is skipped, with the reason, only when the binaries or psycopg are missing or the server does not start.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SERVER_USER = "postgres"  # the account Debian's postgresql package creates
SETTINGS = {"listen_addresses": "127.0.0.1", "fsync": "off", "synchronous_commit": "off",
            "full_page_writes": "off", "max_connections": "50", "shared_buffers": "32MB"}  # fmt: skip


def find_binaries() -> Path | None:
    """The folder of ``initdb`` and ``pg_ctl``: Debian's newest ``/usr/lib/postgresql/<major>/bin``, else PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class PgServer:
    """A running test server: ``url(name)`` names one of its databases, ``create_database()`` makes a fresh one."""

    root: Path
    port: int
    user: str
    _names: Iterator[int]

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = f"test_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}")
        return self.url(name)


def start_server(root: Path) -> PgServer:
    """initdb and start a server in ``root``; pytest.skip with the reason when it cannot start."""
    binaries = find_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb, initdb on PATH): "
                    "install Debian's postgresql package")  # fmt: skip
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as the package's unprivileged user
        try:
            account = pwd.getpwnam(SERVER_USER)
        except KeyError:
            pytest.skip(f"running as root and there is no '{SERVER_USER}' user to run PostgreSQL as")
        if shutil.which("runuser") is None:
            pytest.skip("running as root and runuser (util-linux) is missing to run PostgreSQL unprivileged")
        os.chown(root, account.pw_uid, account.pw_gid)
        prefix = ["runuser", "-u", SERVER_USER, "--"]
    data, log = root / "data", root / "server.log"
    user, port = "cdcca", free_port()

    def run(*command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=120, check=False)

    done = run(str(binaries / "initdb"), "-D", str(data), "-U", user, "--auth=trust", "-E", "UTF8", "--no-sync")
    if done.returncode != 0:
        pytest.skip(f"initdb failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-500:]}")
    for _ in range(3):  # another process may take the free port before the server binds it: try another
        options = " ".join([f"-p {port}", f"-k {root}", *(f"-c {key}={value}" for key, value in SETTINGS.items())])
        done = run(str(binaries / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start")
        if done.returncode == 0:
            return PgServer(root, port, user, itertools.count())
        port = free_port()
    tail = log.read_text()[-800:] if log.exists() else done.stderr
    pytest.skip(f"the PostgreSQL server did not start ({done.returncode}): {tail.strip()}")


def stop_server(server: PgServer) -> None:
    prefix = ["runuser", "-u", SERVER_USER, "--"] if os.geteuid() == 0 else []
    binaries = find_binaries()
    if binaries is not None:
        subprocess.run([*prefix, str(binaries / "pg_ctl"), "-D", str(server.root / "data"), "-m", "immediate",
                        "-w", "stop"], capture_output=True, timeout=60, check=False)  # fmt: skip


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A PostgreSQL server on loopback for the whole session, removed at its end."""
    pytest.importorskip("psycopg", reason="psycopg (the PostgreSQL driver, cdcca[cloud]) is not installed")
    root = Path(tempfile.mkdtemp(prefix="cdcca-pg-"))  # not under pytest's tmp: that is root's alone (0700)
    try:
        server = start_server(root)
        try:
            yield server
        finally:
            stop_server(server)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture()
def pg_url(pg_server: PgServer) -> str:
    """The URL of a fresh, empty database on the session's server."""
    return pg_server.create_database()
