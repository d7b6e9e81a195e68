"""Durable replica state in SQLite: epochs, merge documents, merged results, peers.

The database runs in WAL mode with ``synchronous=FULL``: a transaction that returned has been
fsynced, so anything acknowledged to a client survives ``kill -9`` and power loss. Each merge
document is stored whole (its encoding is small: ~60 bytes per live element), replaced in one
transaction, so a crash leaves either the old or the new document, never a mix.

Tables:

- ``meta(key, value)``: ``replica_id`` and ``epoch`` (bumped and committed on every start, so
  the actor ``replica_id.epoch`` of an incarnation is never reused: dot safety, DESIGN §3);
- ``merges(name, doc)``: the replicated document of each merge (opaque bytes to this module);
- ``merged(digest, merge, root)``: state digest -> merged model root, so a restart does not
  recompute a merge it already finished;
- ``peers(url, info)``: the peer table (for the replication driver).

Methods are blocking; the runtime calls them from a worker thread (``asyncio.to_thread``).
One connection is shared behind a lock (``check_same_thread=False``).
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from crdtmerge.crdt.clock import next_epoch
from crdtmerge.errors import StorageError

__all__ = ["Database"]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS merges (name TEXT PRIMARY KEY, doc BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS merged (
    digest BLOB PRIMARY KEY, merge TEXT NOT NULL, root BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS peers (url TEXT PRIMARY KEY, info BLOB);
"""


def _blob(value: object) -> bytes:
    """A BLOB column's value (every BLOB this module writes is ``bytes``)."""
    if isinstance(value, bytes):
        return value
    raise StorageError(f"node database holds a {type(value).__name__} where bytes belong")


class Database:
    """The node's SQLite file. Open with :meth:`open`; close with :meth:`close`."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path) -> Database:
        """Open (creating if needed) and migrate the database at ``path``.

        Raises:
            StorageError: the file cannot be opened or is not a crdtmerge database.
        """
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                str(path), isolation_level=None, check_same_thread=False, timeout=30
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.executescript(_SCHEMA)
            db = cls(conn)
            version = db.get_meta("schema_version")
            if version is None:
                db.set_meta("schema_version", str(SCHEMA_VERSION))
            elif int(version) != SCHEMA_VERSION:
                raise StorageError(
                    f"{path} has schema version {version}; this build reads {SCHEMA_VERSION}"
                )
            return db
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open the node database {path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StorageError(f"node database write failed: {exc}") from exc

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        with self._lock:
            try:
                return list(self._conn.execute(sql, args))
            except sqlite3.Error as exc:
                raise StorageError(f"node database read failed: {exc}") from exc

    # -- meta / incarnation -----------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def start_incarnation(self, replica_id: str | None = None) -> tuple[str, int]:
        """Return ``(replica_id, epoch)`` for this process, the epoch bumped and committed.

        The epoch is :func:`~crdtmerge.crdt.clock.next_epoch` of the stored one with fresh
        entropy, so even a restored old data directory never reuses an incarnation's actor.
        The replica id is taken from the database, else ``replica_id``, else a random one; a
        ``replica_id`` that differs from the stored one is an error (wrong data directory).
        """
        with self._tx() as c:
            rows = list(c.execute("SELECT value FROM meta WHERE key = 'replica_id'"))
            stored = str(rows[0][0]) if rows else None
            if stored is not None and replica_id is not None and stored != replica_id:
                raise StorageError(
                    f"this data directory belongs to replica {stored!r}, not {replica_id!r}"
                )
            rid = stored or replica_id or secrets.token_hex(8)
            rows = list(c.execute("SELECT value FROM meta WHERE key = 'epoch'"))
            epoch = next_epoch(int(rows[0][0]) if rows else 0, secrets.randbits(32))
            c.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('replica_id', ?)", (rid,))
            c.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('epoch', ?)", (epoch,))
        return rid, epoch

    # -- merge documents --------------------------------------------------------------------

    def load_documents(self) -> dict[str, bytes]:
        return {str(n): _blob(d) for n, d in self._query("SELECT name, doc FROM merges")}

    def save_documents(self, docs: dict[str, bytes]) -> None:
        """Replace the given merges' documents in one fsynced transaction."""
        with self._tx() as c:
            c.executemany(
                "INSERT OR REPLACE INTO merges (name, doc) VALUES (?, ?)", list(docs.items())
            )

    # -- merged results ---------------------------------------------------------------------

    def merged_root(self, digest: bytes) -> bytes | None:
        rows = self._query("SELECT root FROM merged WHERE digest = ?", (digest,))
        return _blob(rows[0][0]) if rows else None

    def record_merged(self, digest: bytes, merge: str, root: bytes) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO merged (digest, merge, root) VALUES (?, ?, ?)",
                (digest, merge, root),
            )

    def merged_roots(self) -> set[bytes]:
        return {_blob(r[0]) for r in self._query("SELECT root FROM merged")}

    # -- peers ------------------------------------------------------------------------------

    def load_peers(self) -> dict[str, bytes | None]:
        return {
            str(u): (_blob(i) if i is not None else None)
            for u, i in self._query("SELECT url, info FROM peers")
        }

    def save_peer(self, url: str, info: bytes | None) -> None:
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO peers (url, info) VALUES (?, ?)", (url, info))
