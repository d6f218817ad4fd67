"""What a failed job's log says first: the exception that ended it, and, when
the code named something the platform sets for it (the MLflow experiment, the
tracking URL, the login), what to change.

A dry run's log is the researcher's to see in full (it ran on the synthetic
twin), but it can open on screens of warnings (GitPython's 15 lines under
mlflow 2.x); the page and the email lead with headline() and hint(). Both read
job-written text: they return plain strings, bounded, for the caller to escape.
"""
from __future__ import annotations

import re

TRACEBACK = "Traceback (most recent call last):"
HEADLINE_MAX = 500
# The platform's own lines in a job's stderr: the relay (host side) and the shim.
_PLATFORM_LINE = re.compile(r"^(relay|shim)\[\d+\] ")

# What the code named that the platform sets, told by the exception it ended on.
# The relay refuses an experiment other than the owner's (singularity/relay.py, denied());
# a URL other than the relay's fails to connect (the job has no network);
# MLflow's basic auth answers a login it does not know with 401.
_EXPERIMENT = re.compile(r"PERMISSION_DENIED.*experiment|experiment.*PERMISSION_DENIED", re.IGNORECASE)
_UNREACHABLE_URL = re.compile(r"API request to (\S+?)(?:/api/\S*)? failed with exception")
_NOT_AUTHENTICATED = re.compile(r"UNAUTHENTICATED|You are not authenticated|error code 401\b|\b401 Client Error")
# Every relay refusal ends on the list of what it allows, experiments included: judge the reason only.
_RELAY_ALLOWS = "The MLflow relay allows only"


def headline(log: str | None) -> str | None:
    """The last line of the log's last Python traceback (``ValueError: ...``):
    what ended the job. None when the log holds no traceback."""
    if not log:
        return None
    lines = log.splitlines()
    starts = [i for i, line in enumerate(lines) if line.rstrip() == TRACEBACK]
    if not starts:
        return None
    for line in lines[starts[-1] + 1:]:
        # frames and source lines are indented; the relay may write between them
        if not line.strip() or line[0] in " \t" or _PLATFORM_LINE.match(line):
            continue
        text = line.strip()
        return text if len(text) <= HEADLINE_MAX else text[:HEADLINE_MAX - 3] + "..."
    return None


def hint(line: str | None, mlflow_url: str) -> str | None:
    """What to change when ``line`` (a headline) says the code named what the
    platform sets for it; None otherwise. ``mlflow_url``: MLflow's URL in a job."""
    if not line:
        return None
    if _EXPERIMENT.search(line.split(_RELAY_ALLOWS)[0]):
        return ("Your code names an MLflow experiment that this job may not use. The platform sets "
                "MLFLOW_EXPERIMENT_NAME to your experiment (in a dry run, to its -dryrun twin): leave out "
                "mlflow.set_experiment(...), or call mlflow.set_experiment(os.environ[\"MLFLOW_EXPERIMENT_NAME\"]).")
    if found := _UNREACHABLE_URL.search(line):
        return (f"Your code sends its MLflow calls to {found.group(1)}, which a job cannot reach: in a job "
                f"MLflow is at {mlflow_url}, and the platform sets MLFLOW_TRACKING_URI to it. Leave out "
                "mlflow.set_tracking_uri(...), or give it os.environ[\"MLFLOW_TRACKING_URI\"].")
    if _NOT_AUTHENTICATED.search(line):
        return ("MLflow did not accept the login your code gave. The platform logs your job in to MLflow as "
                "you: leave out the username and password (MLFLOW_TRACKING_USERNAME, "
                "MLFLOW_TRACKING_PASSWORD) and the tracking URL, and let the platform set them.")
    return None
