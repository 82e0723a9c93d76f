"""The data path of weight fetch (runtime/weight_fetch.py): chunk ranges over a TCP stream, Ray as its control plane.

Moving chunks as Ray objects costs copies on both nodes (the holder's bytes into its object store, the object
manager's transfer, the fetcher's copy out) and bounded a loopback fetch at 0.06 of the link. Here the holder (and
every SlicePeer) also listens on a TCP port of its node's cluster address and answers `(file digest, start, length)`
requests with `socket.sendfile` (from the page cache, no copy in user space); the fetcher pipelines several requests
on one connection and receives each range with `recv_into` straight into its place in the node's slice cache
(an mmap of the cache file), where the loader then reads it.

Who may read: a connection is served only after it proves it knows the server's secret, a random 32 bytes each
server draws at start and hands out only over Ray (`endpoint()`, an actor call: with RAY_AUTH_MODE=token Ray asks
the cluster's token on it, with RAY_USE_TLS=1 it is encrypted): the server sends a fresh nonce, the client answers
HMAC-SHA256(secret, nonce) (challenge-response, as RFC 2104 keyed hashing; the secret never crosses this socket).
A wrong or missing answer closes the connection before any byte of a file is sent. Only files the server was told
to serve (by their digest) are served. When Ray's TLS is on (RAY_USE_TLS=1), this socket speaks TLS too, with
Ray's own certificate, key and CA (RAY_TLS_SERVER_CERT, RAY_TLS_SERVER_KEY, RAY_TLS_CA_CERT; both sides must show
a certificate of that CA, as Ray's gRPC does); otherwise the stream is authenticated but not encrypted, as Ray's
token mode is. What arrives is checked against the holder's chunk table whatever the transport.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import socket
import ssl
import struct
import threading
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)

MAGIC = b"ODW1"  # protocol version 1: nonce, HMAC answer, accept byte, then (digest, start, length) requests
_NONCE = 32
_REQUEST = struct.Struct("!64sQQ")  # file digest (hex), start, length
_REPLY = struct.Struct("!BQ")  # status, bytes that follow
_OK, _UNKNOWN_FILE, _OUT_OF_RANGE = 0, 1, 2
_ACCEPTED = b"\x01"
HANDSHAKE_S = 10.0  # a client that does not answer the challenge in time is dropped


class StreamRefused(ConnectionError):
    """The server closed the connection during the handshake: wrong secret, or not this protocol."""


@dataclass(frozen=True)
class TLSFiles:
    """Ray's TLS material (docs: "TLS authentication"), reused for the weight stream."""

    cert: str
    key: str
    ca: str

    @classmethod
    def from_env(cls) -> TLSFiles | None:
        """Ray's own settings: None unless RAY_USE_TLS is on (read where Ray reads them, in each node's processes)."""
        if os.environ.get("RAY_USE_TLS", "0").lower() not in ("1", "true"):
            return None
        return cls(os.environ["RAY_TLS_SERVER_CERT"], os.environ["RAY_TLS_SERVER_KEY"], os.environ["RAY_TLS_CA_CERT"])

    def context(self, server_side: bool) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_cert_chain(self.cert, self.key)
        ctx.load_verify_locations(self.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED  # mutual, as Ray's gRPC: a client without a CA-signed cert is refused
        ctx.check_hostname = False  # Ray's certificates name nodes by IP or not at all; the CA is the check
        return ctx


@dataclass(frozen=True)
class Endpoint:
    """Where a ChunkServer listens and the secret a client proves; travels only over Ray."""

    host: str
    port: int
    secret: bytes
    tls: bool


def _answer(secret: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, b"od-weights|" + nonce, "sha256").digest()


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            return None
        got += k
    return bytes(buf)


def _normal_priority() -> None:
    """This thread at niceness 0: Ray starts its workers at 15 (worker.py _normal_priority says why that starves
    them on a busy node); serving a fetching node's weights is on that node's critical path. Where the process may
    not raise it, it stays."""
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) > 0:
            os.setpriority(os.PRIO_PROCESS, 0, 0)  # 0: this thread (Linux niceness is per thread)
    except OSError:
        pass


class ChunkServer:
    """Serves byte ranges of the files `resolve(digest)` names (None: not served) to authenticated clients, one
    thread per connection. `pace(n)` is called before `n` bytes are sent (a rate cap may sleep there) and
    `count(n)` after they were."""

    def __init__(self, resolve: Callable[[str], str | None], pace: Callable[[int], None],
                 count: Callable[[int], None], host: str, tls: TLSFiles | None = None) -> None:
        self._resolve, self._pace, self._count = resolve, pace, count
        self._secret = secrets.token_bytes(32)
        self._tls = tls.context(server_side=True) if tls is not None else None
        self._sock = socket.create_server((host, 0), backlog=64)
        self.endpoint = Endpoint(host, self._sock.getsockname()[1], self._secret, tls is not None)
        threading.Thread(target=self._accept, name="weight-stream-accept", daemon=True).start()

    def close(self) -> None:
        self._sock.close()

    def _accept(self) -> None:
        _normal_priority()  # the connections' threads inherit it
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn,), name="weight-stream", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(HANDSHAKE_S)
            if self._tls is not None:
                conn = self._tls.wrap_socket(conn, server_side=True)
            nonce = secrets.token_bytes(_NONCE)
            conn.sendall(MAGIC + nonce)
            answer = _recv_exact(conn, 32)
            if answer is None or not hmac.compare_digest(answer, _answer(self._secret, nonce)):
                log.warning("weights: refused a stream connection from %s (no valid answer to the challenge)",
                            conn.getpeername()[0])
                return
            conn.sendall(_ACCEPTED)
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            files: dict[str, object] = {}
            try:
                while (req := _recv_exact(conn, _REQUEST.size)) is not None:
                    self._send_range(conn, files, *_REQUEST.unpack(req))
            finally:
                for f in files.values():
                    f.close()  # type: ignore[attr-defined]
        except (OSError, ssl.SSLError) as exc:  # the client went away (a killed fetch) or spoke something else
            log.debug("weights: stream connection ended: %s", exc)
        finally:
            conn.close()

    def _send_range(self, conn: socket.socket, files: dict[str, object], digest: bytes, start: int, length: int
                    ) -> None:
        key = digest.decode("ascii", "replace")
        path = self._resolve(key)
        if path is None:
            conn.sendall(_REPLY.pack(_UNKNOWN_FILE, 0))
            return
        f = files.get(path)
        if f is None:
            f = files[path] = open(path, "rb")
        if start + length > os.fstat(f.fileno()).st_size:  # type: ignore[attr-defined]
            conn.sendall(_REPLY.pack(_OUT_OF_RANGE, 0))
            return
        self._pace(length)
        conn.sendall(_REPLY.pack(_OK, length))
        conn.sendfile(f, start, length)  # type: ignore[arg-type]  # zero-copy on plain TCP; TLS falls back to send
        self._count(length)


class ChunkStream:
    """One authenticated connection to a ChunkServer: `request` ranges ahead, then `receive_into` each in order."""

    def __init__(self, endpoint: Endpoint, tls: TLSFiles | None = None, timeout_s: float = 60.0) -> None:
        sock = socket.create_connection((endpoint.host, endpoint.port), timeout=HANDSHAKE_S)
        try:
            if endpoint.tls:
                if tls is None:
                    raise StreamRefused(f"{endpoint.host}:{endpoint.port} speaks TLS and this node has no "
                                        "RAY_USE_TLS settings")
                sock = tls.context(server_side=False).wrap_socket(sock)
            hello = _recv_exact(sock, len(MAGIC) + _NONCE)
            if hello is None or not hello.startswith(MAGIC):
                raise StreamRefused(f"{endpoint.host}:{endpoint.port} is not a weight stream")
            sock.sendall(_answer(endpoint.secret, hello[len(MAGIC):]))
            if _recv_exact(sock, 1) != _ACCEPTED:
                raise StreamRefused(f"{endpoint.host}:{endpoint.port} refused the stream's credentials")
            sock.settimeout(timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._plain = not isinstance(sock, ssl.SSLSocket)

    def request(self, digest: str, start: int, length: int) -> None:
        self._sock.sendall(_REQUEST.pack(digest.encode("ascii"), start, length))

    def receive_into(self, view: memoryview) -> None:
        """The next reply's bytes, into `view` (exactly its length). Raises ConnectionError if the server
        ended the stream or did not serve the range."""
        head = _recv_exact(self._sock, _REPLY.size)
        if head is None:
            raise ConnectionError("the weight stream ended")
        status, n = _REPLY.unpack(head)
        if status != _OK or n != len(view):
            raise ConnectionError(f"the weight stream did not serve the range (status {status})")
        got = 0
        while got < n:
            # MSG_WAITALL: one call per range on plain TCP (the kernel fills the whole view); TLS takes no flags
            k = (self._sock.recv_into(view[got:], n - got, socket.MSG_WAITALL) if self._plain
                 else self._sock.recv_into(view[got:], n - got))
            if not k:
                raise ConnectionError("the weight stream ended mid-range")
            got += k

    def close(self) -> None:
        self._sock.close()
