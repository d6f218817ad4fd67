"""The build's index proxy on real sockets: a tunnel to an allowed host:port
carries bytes both ways; any other host, port or plain-HTTP request is refused
with a 403 and remembered."""
import socket
import threading

import pytest

from gateway.adapters.index_proxy import IndexProxy, parse_hosts


@pytest.fixture
def echo_server():
    """A TCP server on the loopback that answers each line with 'echo: ' + line."""
    server = socket.create_server(("127.0.0.1", 0))
    seen = []

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            seen.append(conn)
            with conn:
                data = conn.recv(1024)
                conn.sendall(b"echo: " + data)

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1], seen
    server.close()


def ask(socket_path, request: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(10)
        client.connect(socket_path)
        client.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += client.recv(4096)
        if answer.startswith(b"HTTP/1.1 200"):
            client.sendall(b"hello\n")
            answer += client.recv(4096)
        else:
            while data := client.recv(4096):
                answer += data
        return answer


def test_index_hosts_are_names_on_port_443_or_name_and_port():
    assert parse_hosts(["PyPI.org", "mirror.local:8443"]) == {("pypi.org", 443), ("mirror.local", 8443)}
    with pytest.raises(ValueError, match="BUILD_INDEX_HOSTS"):
        parse_hosts(["mirror:https"])


def test_a_tunnel_to_an_allowed_host_carries_bytes_both_ways(tmp_path, echo_server):
    port, _ = echo_server
    with IndexProxy(str(tmp_path / "s"), parse_hosts([f"127.0.0.1:{port}"])) as proxy:
        answer = ask(str(tmp_path / "s"), f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert answer == b"HTTP/1.1 200 Connection established\r\n\r\necho: hello\n"
    assert proxy.refused == []


@pytest.mark.parametrize("request_line", [
    "CONNECT 127.0.0.1:{other} HTTP/1.1",     # the allowed host, another port (the gateway's, Redis...)
    "CONNECT localhost:{port} HTTP/1.1",      # another name for it
    "GET http://127.0.0.1:{port}/ HTTP/1.1",  # plain HTTP, even to the allowed host
])
def test_anything_but_a_tunnel_to_an_allowed_host_and_port_is_refused_and_remembered(
        request_line, tmp_path, echo_server):
    port, seen = echo_server
    line = request_line.format(port=port, other=port + 1)
    with IndexProxy(str(tmp_path / "s"), parse_hosts([f"127.0.0.1:{port}"])) as proxy:
        answer = ask(str(tmp_path / "s"), f"{line}\r\nHost: x\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 403 Forbidden") and b"only the package index" in answer, answer
    assert proxy.refused == [line.split()[1].removeprefix("http://").rstrip("/")]
    assert seen == []


def test_where_the_gateway_goes_out_through_a_proxy_the_tunnel_goes_through_it(tmp_path, echo_server, monkeypatch):
    port, _ = echo_server
    site_proxy = socket.create_server(("127.0.0.1", 0))
    asked = []

    def serve_one():
        conn, _ = site_proxy.accept()
        head = b""
        while b"\r\n\r\n" not in head:
            head += conn.recv(4096)
        asked.append(head.split(b"\r\n", 1)[0])
        upstream = socket.create_connection(("127.0.0.1", port))
        conn.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
        upstream.sendall(conn.recv(4096))
        conn.sendall(upstream.recv(4096))
        conn.close()
        upstream.close()

    threading.Thread(target=serve_one, daemon=True).start()
    monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{site_proxy.getsockname()[1]}")
    with IndexProxy(str(tmp_path / "s"), parse_hosts([f"127.0.0.1:{port}"])):
        answer = ask(str(tmp_path / "s"), f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    site_proxy.close()
    assert answer == b"HTTP/1.1 200 Connection established\r\n\r\necho: hello\n"
    assert asked == [f"CONNECT 127.0.0.1:{port} HTTP/1.1".encode()]
