"""Behind nginx (M2D_PROXY_HOPS=1) the gateway sees the client's scheme, host
and address from nginx's X-Forwarded-* headers; without it, it ignores them."""
import pytest
from flask import request

from gateway import create_app

FORWARDED = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "gateway.example.org",
             "X-Forwarded-For": "203.0.113.7"}


@pytest.mark.parametrize("hops, seen", [(1, "https gateway.example.org 203.0.113.7"),
                                        (0, "http localhost 127.0.0.1")])
def test_forwarded_headers_count_only_behind_the_configured_proxies(tmp_path, hops, seen):
    app = create_app({"TESTING": True, "DATA_DIR": str(tmp_path), "PROXY_HOPS": hops,
                      "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'gateway.db'}"})
    app.add_url_rule("/_seen", "seen", lambda: f"{request.scheme} {request.host} {request.remote_addr}")
    assert app.test_client().get("/_seen", headers=FORWARDED).text == seen
