"""DICOM listener (SCP): C-ECHO and C-STORE into the InstanceStore; its configuration and server threads.

Association negotiation uses pynetdicom's PDU codecs (A-ASSOCIATE-RQ decode, A-ASSOCIATE-AC/RJ
encode). The data phase runs on a small blocking loop per association instead of pynetdicom's
reactor: that reactor polls its queues with 1 ms sleeps in two threads, which costs 2-3 ms per
C-STORE (~0.9 s for 300 small MR instances, against ~0.13 s for dcmtk storescp). Here a
thread reads a PDU, and when a message is complete, stores it (durably) and answers at once
(cinesr.service.association; the PDU and DIMSE codec is cinesr.service.dimse).

The dataset is never decoded: the store walks its element structure to check it is complete
and to read the Study/Series/SOP Instance UIDs, then writes the bytes as received.
Memory per association is bounded before it is allocated: PDUs above the announced maximum abort the
association, and dataset buffers come out of one receive budget shared by all associations.
Logs carry UIDs, AE titles and addresses, never patient attributes.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cinesr.service.association import Association, ReceiveBudget
from cinesr.service.dimse import Abort, Closed, abort_pdu
from cinesr.service.store import InstanceStore, StoredInstance

LOGGER = logging.getLogger(__name__)


@dataclass
class ListenerConfig:
    """Network knobs of the listener. ``from_settings`` maps the service settings onto it."""

    ae_title: str = "CINESR"
    port: int = 11112
    host: str = "0.0.0.0"
    allowed_calling_aets: list[str] = field(default_factory=list)  # empty: accept any (logged)
    require_called_aet: bool = False  # True: reject associations not addressed to ae_title
    max_associations: int = 32
    acse_timeout: float = 30.0  # waiting for A-ASSOCIATE-RQ / A-RELEASE
    dimse_timeout: float = 60.0  # between the PDUs of one message
    network_timeout: float = 120.0  # idle association between messages
    max_pdu_size: int = 1 << 20  # announced maximum PDU length we receive (0 = unlimited); longer ones abort
    receive_buffer_bytes: int = 256 << 20  # dataset buffers of all associations together (beyond: 0xA700)
    tls_cert: str | None = None  # PEM certificate; with tls_key turns TLS on
    tls_key: str | None = None
    tls_ca: str | None = None  # if set, clients must present a certificate signed by it

    @classmethod
    def from_settings(cls, settings: Any) -> ListenerConfig:
        """Build from cinesr Settings (or any object with those attribute names)."""
        defaults = cls()
        values = {}
        for name in cls.__dataclass_fields__:
            src = "dicom_port" if name == "port" else ("dicom_host" if name == "host" else name)
            value = getattr(settings, src, None)
            if value is not None and value != "":
                values[name] = value
        config = cls(**{**defaults.__dict__, **values})
        config.allowed_calling_aets = [str(a).strip() for a in config.allowed_calling_aets if str(a).strip()]
        return config

    def ssl_context(self) -> ssl.SSLContext | None:
        if not (self.tls_cert and self.tls_key):
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.tls_cert, self.tls_key)
        if self.tls_ca:
            context.load_verify_locations(self.tls_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context


@dataclass
class ListenerStats:
    """Counters for metrics; read them, don't write them."""

    associations: int = 0
    rejected_associations: int = 0
    echoes: int = 0
    stored: int = 0
    duplicates: int = 0
    conflicts: int = 0  # duplicates whose content differed from the copy kept
    failed: int = 0
    out_of_resources: int = 0


def _server_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = socket.socket(family, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # A receive buffer that holds a whole instance or two: fewer wakeups per C-STORE. Set before
    # listen() so that accepted sockets inherit it (and the TCP window scale that goes with it).
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    server.bind((host, port))
    server.listen(64)
    return server


class DicomListener:
    """A running listener: accept thread plus one thread per association."""

    def __init__(self, config: ListenerConfig, store: InstanceStore) -> None:
        self.config = config
        self.store = store
        self.stats = ListenerStats()
        self.receive_budget = ReceiveBudget(config.receive_buffer_bytes)
        self._ssl = config.ssl_context()
        self._active = 0
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._server = _server_socket(config.host, config.port)
        self.host, self.port = self._server.getsockname()[:2]
        self._thread: threading.Thread | None = None

    @property
    def active_associations(self) -> int:
        return self._active

    @property
    def accepting(self) -> bool:
        """Whether the accept thread runs (readiness)."""
        return self._thread is not None and self._thread.is_alive()

    def admit(self) -> bool:
        """Take an association slot (released when the connection ends); False when all are taken."""
        with self._lock:
            if self._active >= self.config.max_associations:
                return False
            self._active += 1
            return True

    def serve_forever(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, address = self._server.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.01)
                continue
            thread = threading.Thread(target=self._serve_connection, args=(conn, address),
                                      name=f"cinesr-assoc-{address[0]}:{address[1]}", daemon=True)
            thread.start()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="cinesr-listener", daemon=True)
        self._thread.start()

    def _serve_connection(self, conn: socket.socket, address: tuple[str, int]) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle delay on small responses
        raw = conn
        with self._lock:
            self._connections.add(raw)
        assoc: Association | None = None
        try:
            if self._ssl is not None:
                conn.settimeout(self.config.acse_timeout)
                conn = self._ssl.wrap_socket(conn, server_side=True)
            assoc = Association(self, conn, address)
            if assoc.negotiate():
                assoc.serve()
        except Closed:
            if assoc is not None and assoc.admitted:
                LOGGER.warning("connection from %s closed without release", address[0])
        except Abort as exc:
            LOGGER.warning("aborting association from %s: %s", address[0], exc)
            try:
                conn.sendall(abort_pdu(2, exc.reason))
            except OSError:
                pass
        except TimeoutError:
            LOGGER.warning("association from %s timed out", address[0])
            try:
                conn.sendall(abort_pdu(2, 0))
            except OSError:
                pass
        except (OSError, ssl.SSLError) as exc:
            if not self._stopping.is_set():
                LOGGER.warning("connection from %s failed: %s", address[0], exc)
        except Exception:  # never let one association take the listener down
            LOGGER.exception("association from %s failed", address[0])
            try:
                conn.sendall(abort_pdu(2, 0))
            except OSError:
                pass
        finally:
            if assoc is not None:
                try:
                    assoc.writer.close()
                except OSError:
                    LOGGER.exception("closing the journal writer failed")
            if assoc is not None and assoc.admitted:
                with self._lock:
                    self._active -= 1
            with self._lock:
                self._connections.discard(raw)
            try:
                conn.close()
            except OSError:
                pass

    def stop(self) -> None:
        """Stop accepting, abort open associations, and wait for the accept thread."""
        self._stopping.set()
        try:
            self._server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._server.close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)


@dataclass
class ListenerHandle:
    """What ``start_listener`` returns: the bound address, counters, and ``stop()``."""

    listener: DicomListener
    _callback: Callable[[StoredInstance], None] | None = None

    @property
    def port(self) -> int:
        return self.listener.port

    @property
    def host(self) -> str:
        return self.listener.host

    @property
    def ae_title(self) -> str:
        return self.listener.config.ae_title

    @property
    def stats(self) -> ListenerStats:
        return self.listener.stats

    def stop(self) -> None:
        self.listener.stop()
        if self._callback is not None:
            self.listener.store.unsubscribe(self._callback)
            self._callback = None


def start_listener(settings: Any, store: InstanceStore,
                   on_instance: Callable[[StoredInstance], None] | None = None,
                   block: bool = False) -> ListenerHandle:
    """Start the DICOM listener.

    ``settings``: cinesr Settings (ae_title, dicom_port, allowed_calling_aets, and optionally
    max_associations, acse_timeout, dimse_timeout, network_timeout, max_pdu_size, tls_cert,
    tls_key, tls_ca, dicom_host) or a ListenerConfig. Port 0 binds a free port (see ``.port``).
    ``on_instance(StoredInstance)`` is called once per newly stored instance, when its file is
    visible. With ``block=True`` this serves until interrupted, then stops.
    """
    config = settings if isinstance(settings, ListenerConfig) else ListenerConfig.from_settings(settings)
    listener = DicomListener(config, store)
    if on_instance is not None:
        store.subscribe(on_instance)
    handle = ListenerHandle(listener, on_instance)
    LOGGER.info("DICOM listener %s on %s:%d%s", config.ae_title, listener.host, listener.port,
                " (TLS)" if listener._ssl else "")
    if block:
        try:
            listener.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            handle.stop()
    else:
        listener.start()
    return handle
