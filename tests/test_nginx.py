"""The gateway behind nginx with TLS, as deploy/nginx/m2d.conf has it: plain
HTTP sent to HTTPS, the security headers, Secure cookies, an upload that runs
to the end through the proxy, an oversized zip answered as JSON, and the
client's address (X-Forwarded-For, M2D_PROXY_HOPS=1) counted, not nginx's."""
import re

import pytest
import requests
from requests.adapters import HTTPAdapter

from .helpers.invariants import STATUS_MAILS
from .helpers.nginx import Nginx
from .helpers.stack import SAMPLES, Stack, zip_folder


@pytest.fixture(scope="module")
def proxied(testbed):
    proxy = Nginx()
    # three wrong passwords per address a minute: the test of whose address counts
    stack = Stack(**proxy.settings, M2D_LOGIN_LIMIT_ADDRESS="3 per minute", M2D_LOGIN_LIMIT_ACCOUNT="100 per minute")
    try:
        stack.start()
        proxy.start(stack.port, int(stack.env["M2D_MAX_ZIP_BYTES"]))
        yield stack, proxy
    finally:
        proxy.stop()
        stack.stop()


def browser(proxy, source_address=None):
    """A session that trusts the test CA; ``source_address``: connect from
    this loopback address (127.0.0.2: another client, as nginx sees it)."""
    session = requests.Session()
    trust_only_the_test_ca(session, proxy)
    if source_address:
        session.mount("https://", SourceAddress(source_address))
    return session


def trust_only_the_test_ca(session, proxy):
    # not trust_env: REQUESTS_CA_BUNDLE, when set, would win over session.verify
    session.verify, session.trust_env = proxy.ca, False


def through(proxy, researcher):
    """The researcher's API calls go to nginx, over TLS."""
    researcher.url = proxy.url
    trust_only_the_test_ca(researcher.session, proxy)
    return researcher


class SourceAddress(HTTPAdapter):
    def __init__(self, address):
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        kwargs["source_address"] = (self.address, 0)
        super().init_poolmanager(*args, **kwargs)


def test_plain_http_is_sent_to_https(proxied):
    _, proxy = proxied
    response = requests.get(f"{proxy.http_url}/login?next=/x", allow_redirects=False, timeout=30)
    assert response.status_code == 301
    assert response.headers["Location"] == "https://127.0.0.1/login?next=/x"


def test_https_answers_with_hsts_and_the_security_headers(proxied):
    _, proxy = proxied
    response = browser(proxy).get(f"{proxy.url}/login", timeout=30)
    assert response.status_code == 200
    headers = response.headers
    assert headers["Strict-Transport-Security"].startswith("max-age=31536000")
    assert "nosniff" in headers["X-Content-Type-Options"]
    assert "DENY" in headers["X-Frame-Options"]
    assert "same-origin" in headers["Referrer-Policy"]
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]


def test_the_session_cookie_is_secure_and_httponly_behind_the_proxy(proxied):
    _, proxy = proxied
    response = browser(proxy).get(f"{proxy.url}/login", timeout=30)
    cookie = next(c for c in response.raw.headers.getlist("Set-Cookie") if c.startswith("session="))
    flags = {part.strip().lower() for part in cookie.split(";")}
    assert {"secure", "httponly", "samesite=lax"} <= flags, cookie


def test_an_oversized_zip_is_refused_by_the_proxy_as_json_saying_what_to_do(proxied, tmp_path):
    stack, proxy = proxied
    researcher = through(proxy, stack.researcher("big"))
    big = tmp_path / "big.zip"
    big.write_bytes(b"\0" * (int(stack.env["M2D_MAX_ZIP_BYTES"]) + 2 * 1024**2))
    response = researcher.upload(big)
    assert response.status_code == 413
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert body["error"] == "too_large" and "Leave data and model weights out of the zip" in body["message"]
    assert f"larger than {int(stack.env['M2D_MAX_ZIP_BYTES']) // 1024**2} MB" in body["message"]


def test_login_limits_count_the_clients_address_that_nginx_forwards_not_nginxs(proxied):
    """Wrong passwords from 127.0.0.2 use up its allowance, and a forged
    X-Forwarded-For does not get it more; 127.0.0.1 still has its own."""
    _, proxy = proxied

    def wrong_login(session, **headers):
        page = session.get(f"{proxy.url}/login", timeout=30)
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
        return session.post(f"{proxy.url}/login", data={"email": "nobody@example.org", "password": "wrong",
                                                        "csrf_token": token},
                            headers={"Referer": f"{proxy.url}/login", **headers}, timeout=30).status_code

    other = browser(proxy, "127.0.0.2")
    assert [wrong_login(other) for _ in range(3)] == [401, 401, 401]
    assert wrong_login(other) == 429
    assert wrong_login(other, **{"X-Forwarded-For": "203.0.113.50"}) == 429
    assert wrong_login(browser(proxy, "127.0.0.1")) == 401


def test_the_iris_sample_runs_to_the_end_uploaded_through_nginx_with_tls(proxied, tmp_path):
    stack, proxy = proxied
    researcher = through(proxy, stack.researcher("proxied"))
    submission_id = researcher.submit(zip_folder(SAMPLES / "iris", tmp_path / "iris.zip"))
    done = researcher.wait_until(submission_id, {"completed", "failed", "build_failed", "dry_run_failed"})
    assert done["status"] == "completed", done
    mails = researcher.wait_for_mails(submission_id, 4)
    assert [m["Subject"].split(": ", 1)[1] for m in mails] == STATUS_MAILS
    # the links in them are the proxy's https address
    assert f"{proxy.url}/submissions/{submission_id}" in mails[-1].get_body().get_content()
