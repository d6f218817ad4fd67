"""nginx in front of a test stack, as deploy/nginx/m2d.conf has it.

A private instance: its own prefix (config, pid, logs, temp folders) under
the stack's folder, free ports on 127.0.0.1, the testbed's certificate
(deploy/testbed/tls.sh); the machine's own nginx service is never touched.
The template is used as it is, with only the site's values replaced (ports,
certificate, the upload limit), and each replacement must match, so a
template that changes shape fails here instead of being tested half.
"""
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

from .stack import REPO, free_port, wait_for

TEMPLATE = REPO / "deploy" / "nginx" / "m2d.conf"
NGINX = "/usr/sbin/nginx"


def tls_dir() -> Path:
    folder = Path(os.environ.get("M2D_TESTBED_DIR", "/opt/testbed")) / "tls"
    if not (folder / "server.pem").is_file():
        raise RuntimeError(f"no test certificate in {folder}: run deploy/testbed/tls.sh (make testbed does)")
    if not Path(NGINX).is_file():
        raise RuntimeError(f"no {NGINX}: run deploy/bootstrap.sh (make packages), which installs nginx-light")
    return folder


def render(template: str, upstream_port: int, http_port: int, https_port: int, tls: Path,
           max_zip_bytes: int) -> str:
    limit_mb = max_zip_bytes // 1024**2
    replacements = [
        (r"server 127\.0\.0\.1:5000;", f"server 127.0.0.1:{upstream_port};"),
        (r"listen 80;", f"listen 127.0.0.1:{http_port};"),
        (r"listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;"),
        (r"/etc/ssl/m2d/fullchain\.pem", str(tls / "server.pem")),
        (r"/etc/ssl/m2d/privkey\.pem", str(tls / "server.key")),
        (r"client_max_body_size 201m;", f"client_max_body_size {limit_mb + 1}m;"),
        (r"larger than 200 MB", f"larger than {limit_mb} MB"),
    ]
    for pattern, value in replacements:
        template, found = re.subn(pattern, value, template)
        assert found == 1, f"deploy/nginx/m2d.conf no longer has {pattern!r} once"
    return template


class Nginx:
    """Ports chosen at once (the gateway behind it needs its address in its
    settings), started once the gateway's port is known."""

    def __init__(self):
        self.tls = tls_dir()
        self.prefix = Path(tempfile.mkdtemp(prefix="m2d-nginx-", dir="/tmp"))
        self.prefix.chmod(0o755)  # the workers (nobody) use its temp folders
        self.http_port, self.https_port = free_port(), free_port()
        self.url = f"https://localhost:{self.https_port}"
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.ca = str(self.tls / "ca.pem")
        self.proc = None

    @property
    def settings(self):
        """What the gateway behind it needs (docs/admin.md says the same)."""
        return {"M2D_PROXY_HOPS": "1", "M2D_SESSION_COOKIE_SECURE": "1", "M2D_PUBLIC_URL": self.url}

    def start(self, upstream_port: int, max_zip_bytes: int):
        site = render(TEMPLATE.read_text(), upstream_port, self.http_port, self.https_port, self.tls, max_zip_bytes)
        (self.prefix / "m2d.conf").write_text(site)
        temp = "".join(f"    {kind}_temp_path {self.prefix / kind};\n"
                       for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (self.prefix / "nginx.conf").write_text(
            f"daemon off;\nworker_processes 1;\npid {self.prefix / 'nginx.pid'};\n"
            f"error_log {self.prefix / 'error.log'} info;\nevents {{ worker_connections 256; }}\n"
            f"http {{\n    access_log {self.prefix / 'access.log'};\n{temp}"
            f"    include {self.prefix / 'm2d.conf'};\n}}\n")
        argv = [NGINX, "-p", str(self.prefix), "-c", str(self.prefix / "nginx.conf")]
        check = subprocess.run([*argv, "-t"], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        log = open(self.prefix / "stderr.log", "ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self._listening, 30, f"nginx on :{self.https_port}")
        return self

    def _listening(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"nginx exited: {(self.prefix / 'error.log').read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", self.https_port), timeout=1).close()
            return True
        except OSError:
            return False

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGQUIT)  # graceful: the master stops its workers
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        if os.environ.get("M2D_KEEP_TEST_DATA") != "1":
            shutil.rmtree(self.prefix, ignore_errors=True)
