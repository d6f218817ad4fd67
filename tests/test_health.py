"""/healthz asks every part (database, Redis, Slurm, MLflow, SMTP, disk) with a
short timeout each and names the parts that do not answer, with a 503."""
import os
import secrets
import signal
import socket
import subprocess
import uuid

import pytest
import requests
from redis import Redis, RedisError

from gateway import create_app

from .helpers.stack import Stack, free_port, wait_for


@pytest.fixture
def silent_port():
    """A port that accepts connections and never says a word (a hung server)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


def test_health_names_each_part_that_does_not_answer_and_waits_for_none_past_its_timeout(tmp_path, silent_port):
    app = create_app({"TESTING": True, "DATA_DIR": str(tmp_path), "HEALTH_TIMEOUT": 0.5,
                      "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'gateway.db'}",
                      "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
                      "MLFLOW_URL": f"http://127.0.0.1:{free_port()}", "SMTP_PORT": silent_port})
    response = app.test_client().get("/healthz")
    assert response.status_code == 503
    body = response.json
    assert body["ok"] is False
    assert {"redis", "mlflow", "smtp"} <= set(body["down"])
    assert body["checks"]["database"]["ok"] and body["checks"]["disk"]["ok"]
    assert "timed out" in body["checks"]["smtp"]["error"]  # the silent server: its timeout, not forever
    assert "Connection" in body["checks"]["redis"]["error"]


def test_health_reports_the_disk_down_when_a_data_folder_is_short_of_space(tmp_path):
    app = create_app({"TESTING": True, "DATA_DIR": str(tmp_path), "HEALTH_MIN_FREE_MB": 10**12,
                      "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'gateway.db'}"})
    body = app.test_client().get("/healthz").json
    assert "disk" in body["down"]
    assert "DATA_DIR" in body["checks"]["disk"]["error"] and "HEALTH_MIN_FREE_MB" in body["checks"]["disk"]["error"]


# ------------------------------------------------------------ the real stack

class PrivateRedis:
    """A Redis of this test's own, on a free port, with a password; started
    and stopped by its process id (the testbed's :6380 is left alone)."""

    def __init__(self, workdir):
        self.port, self.password, self.workdir = free_port(), secrets.token_hex(16), workdir
        self.url = f"redis://:{self.password}@127.0.0.1:{self.port}/0"
        self.proc = None

    def start(self):
        config = self.workdir / "redis.conf"
        config.write_text(f"bind 127.0.0.1\nport {self.port}\nrequirepass {self.password}\nsave \"\"\n"
                          f"appendonly no\ndir {self.workdir}\n")
        config.chmod(0o600)
        self.proc = subprocess.Popen(["redis-server", str(config)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_for(self._answers, 30, f"the private Redis on :{self.port}")
        except BaseException:
            self.stop()  # a Redis that never answered is not left running
            raise
        return self

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)

    def _answers(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
        try:
            return Redis.from_url(self.url, socket_timeout=1).ping()
        except RedisError:
            return False


@pytest.fixture
def redis_stack(testbed, tmp_path):
    redis = PrivateRedis(tmp_path).start()
    stack = Stack(M2D_REDIS_URL=redis.url, M2D_QUEUE_NAMESPACE=f"m2d-health-{uuid.uuid4().hex[:8]}")
    try:
        yield stack.start(), redis
    finally:
        stack.stop()
        redis.stop()


def test_health_says_redis_is_down_while_it_is_stopped_and_ok_again_once_it_is_back(redis_stack):
    stack, redis = redis_stack
    healthy = requests.get(f"{stack.url}/healthz", timeout=30)
    assert healthy.status_code == 200, healthy.text
    assert healthy.json()["ok"] is True and healthy.json()["down"] == []
    assert set(healthy.json()["checks"]) == {"database", "redis", "slurm", "mlflow", "smtp", "disk"}
    assert "UP" in healthy.json()["checks"]["slurm"]["detail"]

    redis.stop()
    down = requests.get(f"{stack.url}/healthz", timeout=30)
    assert down.status_code == 503
    assert down.json()["down"] == ["redis"], down.json()
    assert redis.password not in down.text

    redis.start()
    wait_for(lambda: requests.get(f"{stack.url}/healthz", timeout=30).status_code == 200, 60,
             "/healthz to be ok once Redis is back")
