"""Move a cloud's SQLite state into PostgreSQL, once one machine is outgrown (issue 16).

``python -m cloud_trainer.migrate STATE/cloud.sqlite postgresql://user@host/db`` copies the samples (pending,
used and quarantined), the robots' chains and adapter states, the published versions and the declined ones in
one PostgreSQL transaction, from one snapshot of the file: the target has all of them or nothing. Stop every
worker before migrating (a sample stored after the snapshot would stay behind); leases are not copied (a lease of a
stopped worker means nothing). A target that holds any of these rows is refused
unless ``--replace`` says to empty it first. The SQLite file is opened as a worker opens it, so a file written
before the ``quarantined`` and ``optimizer`` columns existed is brought up to the current schema first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from cloud_trainer.store import CloudStore
from cloud_trainer.store_pg import PgStore

TABLES = {  # table -> its columns, in the order they are copied (leases: not copied)
    "samples": ("robot_id", "sample_id", "received", "payload", "version", "quarantined"),
    "robots": ("robot_id", "latest", "applied", "student", "optimizer"),
    "published": ("robot_id", "version", "params", "delta"),
    "declined": ("robot_id", "version", "reason"),
}
BATCH = 64  # rows read from SQLite at a time: blobs of adapter states can be megabytes each


class TargetNotEmpty(RuntimeError):
    """The PostgreSQL database already holds a cloud's state; pass ``replace=True`` (``--replace``) to empty it."""


def migrate_sqlite(sqlite_path: str | Path, url: str, replace: bool = False) -> dict[str, int]:
    """Copy the SQLite store at ``sqlite_path`` into the PostgreSQL database at ``url``; rows copied per table.

    Raises:
        FileNotFoundError: no SQLite file at ``sqlite_path``.
        TargetNotEmpty: the target holds rows and ``replace`` is False (nothing is changed).
    """
    if not Path(sqlite_path).is_file():
        raise FileNotFoundError(f"no SQLite store at {sqlite_path}")
    source, target = CloudStore(sqlite_path), PgStore(url)
    try:
        counts: dict[str, int] = {}
        with source._cursor() as read, target._transaction() as write:
            read.execute("BEGIN")  # one snapshot of the file (WAL), whatever a still-running worker writes
            write.execute(f"LOCK TABLE {', '.join([*TABLES, 'queue', 'leases'])} IN EXCLUSIVE MODE")
            held = {table: write.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] for table in TABLES}
            if any(held.values()) and not replace:
                found = ", ".join(f"{n} {table}" for table, n in held.items() if n)
                raise TargetNotEmpty(f"{redact(url)} already holds a cloud's state ({found}): migrate into an empty "
                                     "database, or pass --replace to empty this one first")  # fmt: skip
            if any(held.values()):
                write.execute(f"TRUNCATE {', '.join([*TABLES, 'queue', 'leases'])}")
            for table, columns in TABLES.items():
                rows = read.execute(f"SELECT {', '.join(columns)} FROM {table}")
                with write.cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                    while batch := rows.fetchmany(BATCH):
                        for row in batch:
                            copy.write_row(row)
                counts[table] = write.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            write.execute("INSERT INTO queue (robot_id) SELECT DISTINCT robot_id FROM samples ON CONFLICT DO NOTHING")
            read.execute("COMMIT")
        return counts
    finally:
        source.close()
        target.close()


def redact(url: str) -> str:
    """``url`` without its password (what a log or a terminal may show)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cloud_trainer.migrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("sqlite", type=Path, help="the cloud's SQLite store (STATE_DIR/cloud.sqlite)")
    parser.add_argument("url", help="the PostgreSQL database, e.g. postgresql://cdcca@db.local/cdcca (must exist)")
    parser.add_argument("--replace", action="store_true", help="empty a target that holds a cloud's state first")
    args = parser.parse_args(argv)
    if not args.url.startswith(("postgresql://", "postgres://")):
        parser.error(f"the target must be a postgresql:// URL, not {args.url!r}")
    try:
        counts = migrate_sqlite(args.sqlite, args.url, replace=args.replace)
    except (FileNotFoundError, TargetNotEmpty) as err:
        print(f"migrate: {err}", file=sys.stderr)
        return 2
    print(f"copied into {redact(args.url)}: " + ", ".join(f"{n} {table}" for table, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
