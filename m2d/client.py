"""The gateway's JSON API (/api/v1), as the researcher's client sees it.

The only code in m2d that talks to the gateway. Every failure becomes an ApiError
whose message says what to do: no connection, a bad token, a refused zip (the
gateway's own code and message), an unknown submission.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

import requests
from requests.adapters import HTTPAdapter, Retry

from m2d.contract import __version__
from m2d.contract.states import TERMINAL, Status

from .config import Settings
from .errors import ApiError

__all__ = ["ApiError", "Client", "is_completed", "is_finished"]

TIMEOUT_S = 30
UPLOAD_TIMEOUT_S = 600  # a zip may be up to 200 MB on a slow line
# A read (GET) that meets a dropped connection is asked again: a kept-alive
# connection the server closed meanwhile ("Remote end closed connection without
# response"), a proxy or the gateway restarting. Never a POST: an upload or a
# cancel sent twice could act twice. HTTP errors are answers, not retried.
READ_RETRIES = Retry(total=3, connect=3, read=3, status=0, other=0, backoff_factor=0.5,
                     allowed_methods=frozenset({"GET", "HEAD"}), raise_on_status=False)
# How long `m2d wait` rides out a gateway it cannot reach before it gives up
WAIT_OUTAGE_S = 300


class Client:
    def __init__(self, settings: Settings, warn=None):
        self.url = settings.url
        # told once when the gateway serves another version of m2d (its M2D-Version header)
        self.warn = warn or (lambda text: print(f"m2d: {text}", file=sys.stderr))
        self.version_told = False
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {settings.token}"
        for scheme in ("http://", "https://"):
            self.session.mount(scheme, HTTPAdapter(max_retries=READ_RETRIES))

    def me(self) -> dict:
        return self._call("GET", "/me")

    def usage(self) -> dict:
        return self._call("GET", "/usage")

    def submit(self, zip_path: str | os.PathLike) -> dict:
        zip_path = Path(zip_path)
        with open(zip_path, "rb") as f:
            return self._call("POST", "/submissions", timeout=UPLOAD_TIMEOUT_S,
                              files={"file": (zip_path.name, f, "application/zip")})

    def submissions(self) -> list[dict]:
        return self._call("GET", "/submissions")["submissions"]

    def submission(self, submission_id: int) -> dict:
        return self._call("GET", f"/submissions/{submission_id}")

    def cancel(self, submission_id: int) -> dict:
        return self._call("POST", f"/submissions/{submission_id}/cancel")

    # --- the export airlock --------------------------------------------------

    def export(self, submission_id: int) -> dict:
        return self._call("GET", f"/submissions/{submission_id}/export")

    def release(self, submission_id: int, justification: str) -> dict:
        """Ask reviewers to release every export file not yet requested (the
        owner does not see their names before; the justification says which are needed)."""
        return self._call("POST", f"/submissions/{submission_id}/release-requests",
                          json={"justification": justification})

    def provenance(self, submission_id: int) -> dict:
        return self._call("GET", f"/submissions/{submission_id}/provenance")

    def download(self, submission_id: int, path: str, out: str | os.PathLike) -> dict:
        """Stream a released file to ``out``, resuming a partial one with a Range
        request, then check its sha256 against the manifest. ApiError sha256_mismatch
        (the bad file kept as out + ".bad") when the bytes differ."""
        listed = {f["path"]: f for f in self.export(submission_id)["files"]}
        if path not in listed:
            raise ApiError("not_released", f"Submission {submission_id} has no released file {path!r}; "
                           f"m2d export {submission_id} lists the released ones.", 404)
        expected = listed[path]
        out = Path(out)
        have = out.stat().st_size if out.is_file() else 0
        if have > expected["size"]:
            have = 0  # not a prefix of this file: start again
        headers = {"Range": f"bytes={have}-"} if 0 < have < expected["size"] else {}
        resumed = False
        if have < expected["size"] or expected["size"] == 0:
            response = self._request("GET", f"/submissions/{submission_id}/export/{path}",
                                     headers=headers, stream=True)
            with response:
                if response.status_code >= 400:
                    self._check(response)
                resumed = response.status_code == 206
                if resumed and not response.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
                    raise ApiError("bad_response", f"asked for {path} from byte {have}, the gateway sent "
                                   f"{response.headers.get('Content-Range')!r}; {out} is left as it was.")
                with open(out, "ab" if resumed else "wb") as f:
                    try:
                        for chunk in response.iter_content(1 << 16):
                            f.write(chunk)
                    except requests.RequestException as e:
                        # what arrived is a prefix of the file: keep it, the next run asks for the rest
                        raise ApiError("interrupted", f"The transfer of {path} stopped after {f.tell()} of "
                                       f"{expected['size']} bytes ({_reason(e)}). The bytes so far are in {out}: "
                                       "run the same command again to resume from there.") from None
        digest = hashlib.sha256()
        with open(out, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != expected["sha256"]:
            bad = out.with_name(out.name + ".bad")
            out.replace(bad)
            raise ApiError("sha256_mismatch", f"{path}: the downloaded bytes have sha256 {digest.hexdigest()}, "
                           f"the manifest says {expected['sha256']}; kept as {bad}. Run the download again.")
        return {"submission_id": submission_id, "path": path, "out": str(out), "size": out.stat().st_size,
                "sha256": expected["sha256"], "verified": True, "resumed_from": have if resumed else 0}

    def wait(self, submission_id: int, timeout_s: float | None = None, poll_s: float = 2.0,
             on_change=None) -> dict:
        """Poll until the submission reaches a terminal state; return it. Calls
        on_change(submission) each time the status changes. TimeoutError when
        timeout_s passes first."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        last, unreachable_since = None, None
        while True:
            try:
                submission = self.submission(submission_id)
                unreachable_since = None
            except ApiError as e:
                # a wait may last hours: a gateway restart or a network blip is not its end
                if e.code not in ("no_connection", "timeout"):
                    raise
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since >= WAIT_OUTAGE_S or (
                        deadline is not None and time.monotonic() >= deadline):
                    raise
                time.sleep(poll_s)
                continue
            if submission["status"] != last and on_change:
                on_change(submission)
            last = submission["status"]
            if is_finished(submission):
                return submission
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"submission {submission_id} is still {last} after {timeout_s:g} s")
            time.sleep(poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic())))

    def _call(self, method: str, path: str, timeout: float = TIMEOUT_S, **kwargs) -> dict:
        return self._check(self._request(method, path, timeout, **kwargs))

    def _request(self, method: str, path: str, timeout: float = TIMEOUT_S, **kwargs) -> requests.Response:
        url = f"{self.url}/api/v1{path}"
        try:
            response = self.session.request(method, url, timeout=timeout, **kwargs)
        except requests.Timeout:
            raise ApiError("timeout", f"The gateway at {self.url} did not answer within {timeout} s. "
                           "Try again later.") from None
        except requests.RequestException as e:
            raise ApiError("no_connection", f"Cannot reach the gateway at {self.url} ({_reason(e)}). "
                           "Check the URL (m2d login --url ...) and your network.") from None
        self._compare_versions(response.headers.get("M2D-Version"))
        return response

    def _compare_versions(self, served: str | None) -> None:
        if served and served != __version__ and not self.version_told:
            self.version_told = True
            self.warn(f"this is m2d {__version__}; the gateway at {self.url} serves m2d {served}. Install its "
                      f"version: pip install {self.url}/download/m2d-{served}-py3-none-any.whl (see {self.url}/client)")

    def _check(self, response: requests.Response) -> dict:
        method, url = response.request.method, response.url
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise ApiError("bad_response", f"{method} {url} answered HTTP {response.status_code} "
                           "without the API's JSON: is this the gateway's URL?", response.status_code)
        if response.status_code == 401:
            raise ApiError(body.get("error", "unauthorized"),
                           f"{body.get('message', 'The gateway refused your token.')} "
                           "Then run: m2d login --url URL --token TOKEN", 401)
        if response.status_code >= 400:
            raise ApiError(body.get("error", "http_error"),
                           body.get("message", f"HTTP {response.status_code}"), response.status_code)
        return body


def is_finished(submission: dict) -> bool:
    return Status(submission["status"]) in TERMINAL


def is_completed(submission: dict) -> bool:
    return submission["status"] == Status.COMPLETED


def _reason(error: requests.RequestException) -> str:
    # requests wraps urllib3's errors several deep; the innermost one says it plainly
    # ("Connection refused", "Name or service not known").
    while error.__context__ is not None and error.__context__ is not error:
        error = error.__context__
    text = str(error)
    return text.rsplit(": ", 1)[-1].strip("')\"") or type(error).__name__
