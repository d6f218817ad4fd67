"""A test stack's admin commands (`flask --app gateway users create ...`) in one
process of the gateway's account that stays up, instead of a new Python per
command: each command is the same click command the `flask` CLI runs, on an
app made for it alone, but the ~0.8 s of CPU a `flask` process spends importing
Flask, SQLAlchemy and Alembic is paid once per stack, not ~280 times a suite
(241 s, 14 % of the whole suite's CPU, on a 2-core machine). Tests of the CLI
itself run the real `flask` (Stack.flask with ``env``, test_admin_as_root,
DocumentedStack).

    python -m tests.helpers.admin     # one JSON line in: ["users", "list"];
                                      # one out: {"code": 0, "stdout": ..., "stderr": ...}
"""
import io
import json
import os
import subprocess
import sys
import threading
import traceback


class _Captured(io.TextIOBase):
    """sys.stdout and sys.stderr while a command runs: what it writes, for its
    answer (logging's handler keeps the stream it was given: this object)."""

    def __init__(self):
        self.parts = []

    def writable(self):
        return True

    def write(self, text):  # (click writes bytes to a stream it finds no encoding on)
        self.parts.append(text.decode() if isinstance(text, bytes) else text)
        return len(text)

    def take(self):
        text, self.parts = "".join(self.parts), []
        return text


def serve(requests, answers):
    from flask.cli import FlaskGroup

    from gateway import create_app
    from gateway.extensions import db

    made = []

    def fresh_app():  # as the CLI: an app per command, its engines closed after it
        made.append(create_app())
        return made[-1]

    out, err = _Captured(), _Captured()
    sys.stdout, sys.stderr, sys.stdin = out, err, io.StringIO()  # a prompt reads nothing, never a request
    for line in requests:
        args = json.loads(line)
        try:
            FlaskGroup(create_app=fresh_app, load_dotenv=False).main(args, prog_name="flask")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception:  # noqa: BLE001 - what the CLI prints before it exits 1
            traceback.print_exc()
            code = 1
        for app in made:
            with app.app_context():
                for engine in db.engines.values():
                    engine.dispose()
        made.clear()
        answers.write(json.dumps({"code": code, "stdout": out.take(), "stderr": err.take()}) + "\n")
        answers.flush()


class AdminShell:
    """The client: ``run(args)`` answers as subprocess.run of `flask ARGS` would."""

    def __init__(self, argv_prefix, env, cwd, log):
        self.env = dict(env)
        self.lock = threading.Lock()
        with open(log, "ab") as stderr:
            self.proc = subprocess.Popen([*argv_prefix, sys.executable, "-m", "tests.helpers.admin"], cwd=cwd,
                                         env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=stderr, text=True)

    def run(self, args):
        with self.lock:
            self.proc.stdin.write(json.dumps(list(args)) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the stack's admin process ended (exit {self.proc.wait(timeout=30)}) "
                                 f"before it answered: flask {' '.join(args)}")
        answer = json.loads(line)
        return subprocess.CompletedProcess(["flask", *args], answer["code"], answer["stdout"], answer["stderr"])

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)


if __name__ == "__main__":
    # the answers on a copy of stdout; what a command's own subprocesses print
    # (fd 1 and 2) goes to stderr, the stack's log, never into an answer
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    try:
        serve(sys.stdin, answers)
    except BaseException:
        traceback.print_exc(file=sys.__stderr__)  # the stack's log: sys.stderr is a command's
        raise
