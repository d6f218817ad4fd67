"""POST /slurm/events: Slurm says a job started or ended (deploy/libexec/m2d-slurm-event,
run by slurmctld as PrologSlurmctld and as the jobcomp/script plugin's script).

The post carries a job id and nothing the gateway believes: the id goes on a
Redis list (gateway.queue) and the poller's process asks sacct about that job
at once (jobs.events). So a forged or replayed post costs one sacct lookup,
never a wrong state; the bearer token (SLURM_EVENTS_TOKEN) keeps even that to
the controller. Without a token set the endpoint does not exist (404).
"""
from __future__ import annotations

import hmac
import logging
import re

from flask import Blueprint, abort, current_app, request
from redis.exceptions import RedisError

from .. import queue
from ..extensions import csrf

log = logging.getLogger(__name__)
bp = Blueprint("events", __name__)
csrf.exempt(bp)  # a machine's post with a bearer token, no session

JOB_ID = re.compile(r"[0-9]{1,20}")


@bp.post("/slurm/events")
def slurm_event():
    token = current_app.config["SLURM_EVENTS_TOKEN"]
    if not token:
        abort(404)
    if not hmac.compare_digest(request.headers.get("Authorization", "").encode(), f"Bearer {token}".encode()):
        abort(403)
    job_id = request.form.get("job_id", "")
    if not JOB_ID.fullmatch(job_id):
        abort(400, "job_id: a Slurm job id (digits)")
    try:
        queue.push_job_event(job_id)
    except RedisError as e:  # the hook only logs it; the poll finds the change
        log.warning("Slurm's event for job %s was not kept: %s", job_id, e)
        abort(503)
    return "", 204
