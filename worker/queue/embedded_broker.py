"""An embedded, persistent kombu transport on one SQLite file: the broker when BROKER_URL is empty.

Why not kombu's filesystem or SQLAlchemy transports: both delete a message when a worker takes it, so a
worker killed mid-task (kill -9, OOM, power) loses the task even with late acknowledgement. Here a taken
message stays in the table, marked with its owner (host:pid) and the time it was taken, until the task
is acknowledged (row deleted) or rejected/requeued (mark cleared). A message whose owner process is gone
(same host) or that has been held longer than the visibility timeout becomes visible again, so after a
crash the next worker picks the task up again: the same guarantee Redis gives, without a server.

Only direct (point-to-point) queues are needed by CineSR; fan-out (remote control) is not supported, so
the embedded worker runs without remote control, gossip, mingle and events.

URL: ``cinesr-sqlite://`` with transport option ``path`` (the database file).
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from queue import Empty
from typing import Any

from cinesr.worker.queue.owner import owner_alive
from kombu.transport import TRANSPORT_ALIASES, virtual

SCHEME = "cinesr-sqlite"
TRANSPORT_ALIASES[SCHEME] = "cinesr.worker.queue.embedded_broker:Transport"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    tag TEXT NOT NULL UNIQUE,
    payload TEXT NOT NULL,
    owner TEXT,
    taken_at REAL
);
CREATE INDEX IF NOT EXISTS messages_ready ON messages (queue, owner, id);
"""

_HOST = socket.gethostname()


def _owner() -> str:
    # Per process: a forked child is a different owner from its parent.
    return f"{_HOST}:{os.getpid()}"


def _owner_alive(owner: str) -> bool:
    # another machine's process: only the visibility timeout can free its messages
    return owner_alive(owner, _HOST)


class Database:
    """The message table; one short transaction per operation, safe across processes (WAL)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._connection().executescript(_SCHEMA)  # executescript commits by itself

    def _connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():  # never share across fork
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # a queued task survives power loss
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    @contextmanager
    def transaction(self) -> Any:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def put(self, queue: str, message: dict[str, Any]) -> None:
        tag = message["properties"]["delivery_tag"]
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO messages (queue, tag, payload) VALUES (?, ?, ?)",
                       (queue, tag, json.dumps(message)))

    def take(self, queue: str, owner: str) -> dict[str, Any] | None:
        with self.transaction() as db:
            row = db.execute("SELECT id, payload FROM messages WHERE queue = ? AND owner IS NULL ORDER BY id LIMIT 1",
                             (queue,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE messages SET owner = ?, taken_at = ? WHERE id = ?", (owner, time.time(), row[0]))
        return json.loads(row[1])

    def ack(self, tag: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM messages WHERE tag = ?", (tag,))

    def release(self, tag: str) -> None:
        """Make a taken message visible again (requeue), marked as redelivered."""
        with self.transaction() as db:
            row = db.execute("SELECT payload FROM messages WHERE tag = ?", (tag,)).fetchone()
            if row is not None:
                self._free(db, tag, row[0])

    @staticmethod
    def _free(db: sqlite3.Connection, tag: str, payload_text: str) -> None:
        # Celery reads request.delivery_info["redelivered"] from here (as Redis sets it on a restore).
        payload = json.loads(payload_text)
        payload["redelivered"] = True
        payload.setdefault("properties", {}).setdefault("delivery_info", {})["redelivered"] = True
        db.execute("UPDATE messages SET owner = NULL, taken_at = NULL, payload = ? WHERE tag = ?",
                   (json.dumps(payload), tag))

    def reclaim(self, visibility_timeout: float) -> int:
        """Free messages whose owner died or that were held past the visibility timeout; returns how many."""
        freed = 0
        with self.transaction() as db:
            rows = db.execute("SELECT tag, owner, taken_at, payload FROM messages WHERE owner IS NOT NULL").fetchall()
            now = time.time()
            for tag, owner, taken_at, payload in rows:
                if not _owner_alive(owner) or now - (taken_at or now) > visibility_timeout:
                    self._free(db, tag, payload)
                    freed += 1
        return freed

    def size(self, queue: str, *, ready_only: bool = True) -> int:
        conn = self._connection()
        sql = "SELECT COUNT(*) FROM messages WHERE queue = ?" + (" AND owner IS NULL" if ready_only else "")
        return int(conn.execute(sql, (queue,)).fetchone()[0])

    def purge(self, queue: str) -> int:
        with self.transaction() as db:
            return db.execute("DELETE FROM messages WHERE queue = ? AND owner IS NULL", (queue,)).rowcount


class QoS(virtual.QoS):
    """Acknowledgement deletes the row; rejection with requeue clears its owner."""

    def ack(self, delivery_tag: str) -> None:
        self.channel.db.ack(delivery_tag)
        super().ack(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if requeue:
            self.channel.db.release(delivery_tag)
        else:
            self.channel.db.ack(delivery_tag)
        self._quick_ack(delivery_tag)

    def restore_unacked(self) -> list[Any]:
        # Graceful shutdown: hand every unacknowledged message back at once (no wait for a timeout).
        self._flush()
        errors = []
        while self._delivered:
            tag, message = self._delivered.popitem()
            try:
                self.channel.db.release(tag)
            except Exception as exc:  # noqa: BLE001 - reported by kombu's restore_unacked_once
                errors.append((exc, message))
        return errors


class Channel(virtual.Channel):
    QoS = QoS
    # How often a consumer looks for messages of dead owners or past their visibility timeout.
    reclaim_interval = 2.0

    def __init__(self, connection: Any, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        options = connection.client.transport_options
        path = options.get("path") or os.environ.get("CINESR_EMBEDDED_BROKER") or "cinesr-broker.sqlite"
        self.db = Database(Path(path))
        self.visibility_timeout = float(options.get("visibility_timeout", 3600))
        self._next_reclaim = 0.0

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        now = time.monotonic()
        if now >= self._next_reclaim:
            self._next_reclaim = now + self.reclaim_interval
            self.db.reclaim(self.visibility_timeout)
        message = self.db.take(queue, _owner())
        if message is None:
            raise Empty()
        return message

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        self.db.put(queue, message)

    def _restore(self, message: Any) -> None:
        self.db.release(message.delivery_tag)

    def _size(self, queue: str) -> int:
        return self.db.size(queue)

    def _purge(self, queue: str) -> int:
        return self.db.purge(queue)

    def _delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        self.db.purge(queue)

    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        pass

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        return True


class Transport(virtual.Transport):
    Channel = Channel
    # Seconds between polls of an empty queue: the latency a newly queued task can wait.
    polling_interval = 0.2
    driver_type = "sqlite"
    driver_name = "sqlite3"
    implements = virtual.Transport.implements.extend(asynchronous=False, exchange_type=frozenset(["direct"]))

    # Longest one wait for a message may block. Celery's blocking loop drains with a 2 s timeout and checks for
    # a shutdown request only between drains; capped, a SIGTERM'd idle worker stops about 2 s sooner.
    drain_timeout = 0.5

    def driver_version(self) -> str:
        return sqlite3.sqlite_version

    def drain_events(self, connection: Any, timeout: float | None = None) -> Any:
        capped = self.drain_timeout if timeout is None else min(timeout, self.drain_timeout)
        return super().drain_events(connection, timeout=capped)

    @property
    def default_connection_params(self) -> dict[str, Any]:
        # The queue is a file in DATA_DIR, there is no host: without a default hostname kombu no longer logs
        # "No hostname was supplied. Reverting to default 'localhost'" on every connection.
        return {}
