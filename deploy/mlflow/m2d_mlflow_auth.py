"""MLflow's basic-auth check with a verified-credential cache in front of it.

MLflow's basic-auth app (3.17) hashes the password (werkzeug's scrypt, about 250 ms
of a CPU) on every request: a site whose every running job's relay calls once a
second saturates on the hash alone, at a few calls a second. This module is the
auth app's documented plug-in point, `authorization_function` in its ini:

    authorization_function = m2d_mlflow_auth:authenticate_request

on the MLflow server's PYTHONPATH (deploy/testbed/mlflow.sh puts it there). A
request whose (user, password) MLflow's own check has accepted before, against the
password hash the user has NOW, is accepted without hashing again; anything else
goes to MLflow's own check (authenticate_request_basic_auth) unchanged. So:

- what was verified is kept in the auth database (table m2d_verified_logins, one row
  per user), so every worker of every server on that database shares it: a login is
  hashed once, not once per worker (a cluster's 200 jobs starting on 4 workers were
  800 hashes, a third of MLflow's CPU while they logged), and not again after a
  restart.
- the user's stored password hash is read with it on every request (one indexed
  SELECT) and is part of what was verified: a password changed or a user deleted, by
  any worker or straight in the database, refuses the old password at once on every
  worker. (MLflow's own cache, auth_cache_ttl_seconds, keys on the password alone and
  keeps an old password valid on the other workers until its TTL ends; its TTL also
  re-hashes every user's password on every worker each period.)
- a wrong password, another user's password or an unknown user is a miss, and MLflow
  refuses it as before; nothing is kept for a refusal.
- a row is an HMAC of (user, password, stored hash) under a key derived from
  MLFLOW_FLASK_SERVER_SECRET_KEY, which every worker and server of the site shares:
  the database holds nothing a password could be guessed from without that key. A
  verification counts M2D_MLFLOW_AUTH_CACHE_SECONDS (default 3600), then MLflow
  hashes once more.

The same module keeps each worker's requests within its database pool
(``requests_within_pool``): MLflow's tracking store opens a second session while
the first is open (``log_batch`` holds the run's and asks for one per params,
metrics, tags), and each worker runs up to 40 requests at once (anyio's thread
pool) on a pool of a few connections: under a cluster's relays every connection
was held by an outer session waiting for an inner one, and MLflow answered nothing
until the pool's timeout, again and again ("idle in transaction" in PostgreSQL).
At most M2D_MLFLOW_REQUESTS_AT_ONCE requests (default 4) run in a worker at once;
deploy/testbed/mlflow.sh sizes each store's pool to twice that, so an outer and an
inner session always find their connections. The rest wait in line, holding none.

It also spares MLflow's permission check of a call on a run what it loads each time
only to learn one fact: the run's experiment (``remembering_run_requirement``: MLflow
loads the whole run, its params, tags and latest metrics, more with every value logged;
here one narrow SELECT the first time a worker meets the run, then remembered, as a run
never moves to another experiment) and the user's row (``answering_get_user_from_the_login``:
MLflow reads it twice more per request, here it is the row the login was just checked
against). The grants themselves are read on every request as before, so a permission
taken away holds at once. A run not found is not remembered (MLflow refuses it, and
asks again next time).

MLflow's UI hides its "change password" and "log out" items when the function is
not its own; on this platform the gateway holds each researcher's MLflow password
(it hands it to the job's relay), so a password changed in the UI would break that
researcher's jobs: `flask --app gateway users approve EMAIL` sets a new one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
import time
from collections import OrderedDict

from flask import g, has_request_context, request
from mlflow.environment_variables import MLFLOW_ENABLE_WORKSPACES
from mlflow.server import app, auth
from mlflow.server.auth.db.models import SqlUser
from mlflow.server.auth.entities import User
from mlflow.store.tracking.dbmodels.models import SqlRun
from sqlalchemy import Column, Float, MetaData, String, Table, delete, insert, select
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.datastructures import Authorization

RUNS_REMEMBERED = int(os.environ.get("M2D_MLFLOW_RUNS_REMEMBERED", "100000"))
CACHE_SECONDS = float(os.environ.get("M2D_MLFLOW_AUTH_CACHE_SECONDS", "3600"))
REQUESTS_AT_ONCE = int(os.environ.get("M2D_MLFLOW_REQUESTS_AT_ONCE", "4"))

# Ours, beside MLflow's tables in the auth database (MLflow's migrations leave tables
# they do not know alone).
verified_logins = Table(
    "m2d_verified_logins", MetaData(),
    Column("username", String(255), primary_key=True),
    Column("digest", String(64), nullable=False),  # hex HMAC of (user, password, stored hash)
    Column("verified_at", Float, nullable=False),  # time.time() when MLflow accepted it
)


# the key of the digests: the same in every worker and server of the site, secret as the site's
_key = hmac.new(auth.get_flask_server_secret_key().encode(), b"m2d verified logins", hashlib.sha256).digest()


def login_digest(username: str, password: str, password_hash: str) -> str:
    message = json.dumps([username, password, password_hash]).encode("utf-8", "surrogatepass")
    return hmac.new(_key, message, hashlib.sha256).hexdigest()


def stored_login(username: str):
    """The user's row (id, password hash, is_admin) with the digest verified for that
    hash and when (None, None if none), or None."""
    with auth.store.ManagedSessionMaker(read_only=True) as session:
        return session.execute(
            select(SqlUser.id, SqlUser.password_hash, SqlUser.is_admin, verified_logins.c.digest,
                   verified_logins.c.verified_at)
            .outerjoin(verified_logins, verified_logins.c.username == SqlUser.username)
            .where(SqlUser.username == username)).one_or_none()


def remember(username: str, digest: str) -> None:
    try:
        with auth.store.ManagedSessionMaker(read_only=False) as session:
            session.execute(delete(verified_logins).where(verified_logins.c.username == username))
            session.execute(insert(verified_logins).values(username=username, digest=digest,
                                                           verified_at=time.time()))
    except SQLAlchemyError:
        # Another worker verified the same login at the same moment (its row serves), or
        # the write failed: then the next request is MLflow's own check again.
        pass


def authenticate_request() -> Authorization | object:
    """The request's Authorization when its basic-auth login is right, else
    MLflow's own 401 answer (the contract of `authorization_function`).
    MLflow asks up to three times per request (before it, whether the sender is
    an admin, whose the request is): the first answer is kept for the others."""
    if "m2d_authorization" not in g:
        g.m2d_authorization = check_credentials()
    return g.m2d_authorization


def check_credentials() -> Authorization | object:
    credentials = request.authorization
    if credentials is None or credentials.type != "basic" or not credentials.username:
        return auth.authenticate_request_basic_auth()
    login = stored_login(credentials.username)
    if login is None:
        return auth.authenticate_request_basic_auth()  # an unknown user: MLflow refuses
    digest = login_digest(credentials.username, credentials.password or "", login.password_hash)
    if (login.digest is not None and hmac.compare_digest(login.digest, digest)
            and time.time() - login.verified_at < CACHE_SECONDS):
        answer = credentials
    else:
        answer = auth.authenticate_request_basic_auth()  # MLflow's own check, the password hash and all
        if isinstance(answer, Authorization):
            remember(credentials.username, digest)
    if isinstance(answer, Authorization):
        g.m2d_user = User(login.id, credentials.username, login.password_hash, login.is_admin)
    return answer


def requests_within_pool(wsgi_app, at_once: int):
    """``wsgi_app`` running at most ``at_once`` requests at a time; the others wait."""
    slots = threading.BoundedSemaphore(at_once)

    def limited(environ, start_response):
        with slots:
            return wsgi_app(environ, start_response)

    limited.m2d_requests_at_once = at_once
    return limited


def remembering_run_requirement(run_requirement, experiment_of_run, size: int):
    """MLflow's ``_run_requirement(run_id, action)`` (the experiment a call on the run
    is checked against, and what it needs there), answered from two memories: each
    run's experiment (``size`` runs; a run never moves to another experiment), and
    MLflow's answer per experiment and action. A run met for the first time costs one
    narrow SELECT (``experiment_of_run``: its experiment, or None), not MLflow's load
    of the whole run on each worker (a cluster's 200 jobs starting to log at once were
    200 x 4 workers such loads, a sixth of MLflow's CPU). MLflow's answer is shared
    by the runs of an experiment only when it names the experiment and not the run
    (so a later MLflow whose rules look at the run itself is asked for each run);
    anything unusual (a run not found, no narrow lookup) goes to MLflow's own."""
    runs: OrderedDict[str, str] = OrderedDict()
    answers: dict[tuple, tuple] = {}
    lock = threading.Lock()

    def remembering(run_id, action):
        with lock:
            experiment_id = runs.get(run_id)
            if experiment_id is not None:
                runs.move_to_end(run_id)
        if experiment_id is None and experiment_of_run is not None:
            experiment_id = experiment_of_run(run_id)
            if experiment_id is not None:
                with lock:
                    runs[run_id] = experiment_id
                    while len(runs) > size:
                        runs.popitem(last=False)
        answer = answers.get((experiment_id, action)) if experiment_id is not None else None
        if answer is None:
            answer = run_requirement(run_id, action)
            if answer is None:
                return None
            if experiment_id is not None and shareable(answer, run_id, experiment_id):
                answers[(experiment_id, action)] = answer
        anchor, requirements = answer
        return anchor, list(requirements)  # a copy: MLflow's caller may change its list

    remembering.m2d_remembers = True
    return remembering


def shareable(answer, run_id: str, experiment_id: str) -> bool:
    """Whether MLflow's answer for one run holds for every run of its experiment."""
    anchor, _ = answer
    return tuple(anchor) == (auth.RESOURCE_TYPE_EXPERIMENT, experiment_id) and run_id not in repr(answer)


def narrow_run_lookup():
    """``experiment_of_run(run_id)``: the run's experiment id by one indexed SELECT on
    MLflow's tracking store, or None where that is not MLflow's own notion of the run:
    with workspaces on (MLflow finds a run only within the request's workspace) or on
    a store that is not SQL."""
    tracking = auth._get_tracking_store()
    if MLFLOW_ENABLE_WORKSPACES.get() or not hasattr(tracking, "ManagedSessionMaker"):
        return None

    def experiment_of_run(run_id) -> str | None:
        if not isinstance(run_id, str) or not run_id:
            return None
        with tracking.ManagedSessionMaker(read_only=True) as session:
            rows = session.execute(select(SqlRun.experiment_id).where(SqlRun.run_uuid == run_id)).all()
        return str(rows[0].experiment_id) if len(rows) == 1 else None  # none or several: MLflow decides

    return experiment_of_run


def answering_get_user_from_the_login(get_user):
    """The auth store's ``get_user(username)``, answered from the row the login was
    checked against in this request (MLflow asks for the same user twice more on
    every request: whether it is an admin, whose grants to load). A request that
    changes or deletes a user drops that row first (``dropping_the_login_user``)."""
    def get_user_of_request(username):
        user = g.get("m2d_user") if has_request_context() else None
        if user is not None and user.username == username:
            return user
        return get_user(username)

    get_user_of_request.m2d_answers_from_login = True
    return get_user_of_request


def dropping_the_login_user(write):
    def write_then_forget(*args, **kwargs):
        if has_request_context():
            g.pop("m2d_user", None)
        return write(*args, **kwargs)

    return write_then_forget


# Every worker imports this module: the first makes the table, the others find it (or
# lose the race to make it, which changes nothing).
try:
    verified_logins.create(auth.store.engine, checkfirst=True)
except SQLAlchemyError:
    pass

# MLflow imports this module on a worker's first authenticated request (it resolves
# `authorization_function` lazily): the requests already running then are not held
# back (at worst they wait for the pool's timeout once); every later one is.
if not hasattr(app.wsgi_app, "m2d_requests_at_once"):
    app.wsgi_app = requests_within_pool(app.wsgi_app, REQUESTS_AT_ONCE)
# MLflow versions without this helper keep their own check (slower, as right).
if hasattr(auth, "_run_requirement") and not getattr(auth._run_requirement, "m2d_remembers", False):
    auth._run_requirement = remembering_run_requirement(auth._run_requirement, narrow_run_lookup(),
                                                        RUNS_REMEMBERED)
if not getattr(auth.store.get_user, "m2d_answers_from_login", False):
    auth.store.get_user = answering_get_user_from_the_login(auth.store.get_user)
    for name in ("update_user", "delete_user"):
        setattr(auth.store, name, dropping_the_login_user(getattr(auth.store, name)))
