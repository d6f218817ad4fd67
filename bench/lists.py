"""Server time of the submission lists at cluster size.

    .venv/bin/python -m bench.lists [N] [--database URL]

Fills a fresh database (SQLite in a temporary folder unless --database names
an empty one) with N submissions (default 100,000) of 100 researchers, then
times each list's page through Flask's test client (the whole request in the
server: routing, queries, template), first and deep pages, and prints the median
and the 95th percentile over 20 requests each. Target: <= 100 ms a page.
"""
import argparse
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import flask_migrate

from gateway import create_app
from gateway.core.models import ApiToken, Submission, User, utcnow
from gateway.extensions import db
from m2d.contract.states import Status

USERS = 100
REPEAT = 20


def fill(count: int) -> tuple[User, User, str]:
    now = utcnow()
    users = [User(email=f"r{n}@example.org", name=f"Researcher {n}", approved_at=now,
                  mlflow_username=f"r{n}") for n in range(USERS)]
    admin = User(email="admin@example.org", name="Admin", is_admin=True, approved_at=now)
    db.session.add_all([*users, admin])
    db.session.flush()
    statuses = [s.value for s in Status]
    rows = [{"user_id": users[n % USERS].id, "filename": f"s{n}.zip", "status": statuses[n % len(statuses)],
             "created_at": now - timedelta(seconds=count - n), "updated_at": now} for n in range(count)]
    for start in range(0, count, 10_000):
        db.session.execute(db.insert(Submission), rows[start:start + 10_000])
    token = ApiToken.issue(users[0])
    db.session.commit()
    return users[0], admin, token


def timed(client, url, headers=None) -> list[float]:
    times = []
    for _ in range(REPEAT):
        started = time.perf_counter()
        response = client.get(url, headers=headers)
        times.append(time.perf_counter() - started)
        assert response.status_code == 200, (url, response.status_code)
    return times


def log_in(client, session_id):
    with client.session_transaction() as session:
        session["_user_id"] = session_id
        session["_fresh"] = True


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("count", nargs="?", type=int, default=100_000)
    parser.add_argument("--database", help="an empty database's SQLAlchemy URL (default: a new SQLite file)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="m2d-bench-lists-"))
    app = create_app({"TESTING": True, "DATA_DIR": str(folder / "data"), "RATELIMIT_ENABLED": False,
                      "SQLALCHEMY_DATABASE_URI": args.database or f"sqlite:///{folder / 'gateway.db'}",
                      "REDIS_URL": "redis://127.0.0.1:1/0"})
    with app.app_context():
        flask_migrate.upgrade()
        started = time.perf_counter()
        researcher, admin, token = fill(args.count)
        print(f"{args.count} submissions of {USERS} researchers in {time.perf_counter() - started:.1f} s "
              f"({db.engine.dialect.name})")
        deep = db.session.scalar(db.select(Submission.id).filter_by(user_id=researcher.id)
                                 .order_by(Submission.id).limit(1).offset(10))
        oldest = db.session.scalar(db.select(db.func.min(Submission.id)))
        researcher, admin = researcher.get_id(), admin.get_id()
    # requests outside the app context: inside it, g (and flask-login's user) outlives a request
    client = app.test_client()
    bearer = {"Authorization": f"Bearer {token}"}
    pages = [("api, first page", researcher, "/api/v1/submissions", bearer),
             ("api, oldest page", researcher, f"/api/v1/submissions?before={deep}", bearer)]
    log_in(client, researcher)
    results = [(name, timed(client, url, headers)) for name, _, url, headers in pages]
    results += [("my submissions, first page", timed(client, "/")),
                ("my submissions, oldest page", timed(client, f"/?before={deep}"))]
    log_in(client, admin)
    results += [("admin, first page", timed(client, "/admin/submissions")),
                ("admin, oldest page", timed(client, f"/admin/submissions?before={oldest + 30}")),
                ("admin, by status", timed(client, "/admin/submissions?status=running")),
                ("admin, by user", timed(client, "/admin/submissions?user=r42%40")),
                ("admin, by date", timed(client, f"/admin/submissions?from={utcnow():%Y-%m-%d}"))]
    print(f"{'page':<30} {'p50 ms':>8} {'p95 ms':>8}")
    for name, times in results:
        times.sort()
        print(f"{name:<30} {statistics.median(times) * 1e3:>8.1f} {times[int(len(times) * 0.95) - 1] * 1e3:>8.1f}")


if __name__ == "__main__":
    main()
