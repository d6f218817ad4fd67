"""The only way out of an image build: an HTTPS proxy that tunnels to the
package index hosts alone.

A build runs a researcher's sdist build backends (setup.py) in a network
namespace with nothing but a loopback. pip and uv reach the index through
this proxy: it listens on a Unix socket in a folder bound into the build, a
shim inside forwards the build's loopback port to it (singularity/relay.py's shim,
as jobs reach MLflow), and it opens a CONNECT tunnel only to a host:port in
BUILD_INDEX_HOSTS. Anything else (the gateway, MLflow, Redis, SMTP, the
database, any other host, plain-HTTP requests) gets a 403 and is remembered,
so a failed build can say what it reached for.

The names are resolved here, on the gateway host. When the gateway itself
reaches the internet through a proxy (https_proxy in its environment), the
tunnel is opened through that one.
"""

from __future__ import annotations

import os
import socket
import socketserver
import threading
import urllib.parse
from collections.abc import Iterable

HEAD_LIMIT = 16 * 1024
HEAD_TIMEOUT = 30
CONNECT_TIMEOUT = 30
IDLE_TIMEOUT = 300  # a tunnel with no bytes either way this long is closed
MAX_TUNNELS = 64
MAX_REFUSED = 20


def parse_hosts(entries: Iterable[str]) -> frozenset[tuple[str, int]]:
    """'pypi.org' (port 443) or 'host:port', as (host, port) pairs."""
    hosts = set()
    for entry in entries:
        entry = entry.strip().lower()
        host, _, port = entry.rpartition(":") if ":" in entry else (entry, "", "443")
        if not host or not port.isdigit():
            raise ValueError(f"an index host is 'name' or 'name:port', not {entry!r} (BUILD_INDEX_HOSTS)")
        hosts.add((host.strip("[]"), int(port)))
    return frozenset(hosts)


def _upstream_proxy() -> tuple[str, int] | None:
    """The gateway's own HTTPS proxy, if its environment names one."""
    url = os.environ.get("https_proxy") or os.environ.get("HTTPS_PROXY")
    if not url:
        return None
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    return (parts.hostname, parts.port or 80) if parts.hostname else None


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    proxy: IndexProxy


class _Tunnel(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        proxy = self.server.proxy
        if not proxy.slots.acquire(blocking=False):
            self._answer(503, "too many connections at once from this build")
            return
        try:
            self._handle(proxy)
        finally:
            proxy.slots.release()

    def _handle(self, proxy: IndexProxy) -> None:
        client = self.request
        client.settimeout(HEAD_TIMEOUT)
        head = b""
        try:
            while b"\r\n\r\n" not in head:
                data = client.recv(4096)
                if not data or len(head) > HEAD_LIMIT:
                    return
                head += data
        except OSError:
            return
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        method, _, rest = request_line.partition(" ")
        target = rest.rsplit(" ", 1)[0]
        if method != "CONNECT":
            # a plain-HTTP request names its host in an absolute URL
            netloc = urllib.parse.urlsplit(target).netloc or target
            proxy.refuse(netloc)
            self._answer(403, f"the build may reach only the package index over HTTPS, not {netloc}")
            return
        host, _, port = target.rpartition(":")
        host = host.strip("[]").lower()
        if not port.isdigit() or (host, int(port)) not in proxy.allowed:
            proxy.refuse(target)
            self._answer(403, f"the build may reach only the package index, not {target}")
            return
        try:
            upstream = self._open(host, int(port))
        except OSError as e:
            self._answer(502, f"could not reach {target}: {e}")
            return
        with upstream:
            try:
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            except OSError:
                return
            extra = head.split(b"\r\n\r\n", 1)[1]
            if extra:  # a client that spoke first (TLS hello sent with the CONNECT)
                upstream.sendall(extra)
            for side in (client, upstream):
                side.settimeout(IDLE_TIMEOUT)
            back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
            back.start()
            _pump(client, upstream)
            back.join()

    def _open(self, host: str, port: int) -> socket.socket:
        via = _upstream_proxy()
        if via is None:
            return socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
        upstream = socket.create_connection(via, timeout=CONNECT_TIMEOUT)
        upstream.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = upstream.recv(4096)
            if not data or len(answer) > HEAD_LIMIT:
                upstream.close()
                raise OSError("the site's proxy closed the connection")
            answer += data
        status_line = answer.split(b"\r\n", 1)[0].decode("latin-1")
        if status_line.split(" ", 2)[1:2] != ["200"]:
            upstream.close()
            raise OSError(f"the site's proxy said {status_line}")
        return upstream

    def _answer(self, status: int, message: str) -> None:
        reason = {403: "Forbidden", 502: "Bad Gateway", 503: "Service Unavailable"}[status]
        body = (message + "\n").encode()
        try:
            self.request.sendall(f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
                                 f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        except OSError:
            pass


def _pump(source: socket.socket, target: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            target.sendall(data)
        target.shutdown(socket.SHUT_WR)
    except OSError:
        for side in (source, target):
            try:
                side.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class IndexProxy:
    """One build's proxy, serving on ``socket_path`` until closed."""

    def __init__(self, socket_path: str, allowed: frozenset[tuple[str, int]]):
        self.allowed = allowed
        self.refused: list[str] = []
        self.slots = threading.BoundedSemaphore(MAX_TUNNELS)
        self._lock = threading.Lock()
        self._server = _Server(socket_path, _Tunnel)
        self._server.proxy = self
        self._thread = threading.Thread(target=self._server.serve_forever, name="m2d-index-proxy", daemon=True)

    def refuse(self, destination: str) -> None:
        with self._lock:
            if destination not in self.refused and len(self.refused) < MAX_REFUSED:
                self.refused.append(destination)

    def __enter__(self) -> IndexProxy:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
