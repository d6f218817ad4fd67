"""The life of a submission, written down once.

Every part of the system (workers, poller, web pages, API, emails) moves a
submission only along TRANSITIONS; ``gateway.lifecycle.advance`` enforces it.
"""
from enum import Enum


class Status(str, Enum):
    RECEIVED = "received"
    BUILDING = "building"
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    BUILD_FAILED = "build_failed"
    CANCELLED = "cancelled"

    def __str__(self):
        return self.value

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.BUILD_FAILED, Status.CANCELLED})

TRANSITIONS = {
    Status.RECEIVED: {Status.BUILDING, Status.CANCELLED},
    # failed: Slurm refused the job (bad partition, limits), so it never queued
    Status.BUILDING: {Status.QUEUED, Status.BUILD_FAILED, Status.FAILED, Status.CANCELLED},
    # a job can fail or be cancelled before it ever ran (NODE_FAIL, scancel)
    Status.QUEUED: {Status.RUNNING, Status.FAILED, Status.CANCELLED},
    Status.RUNNING: {Status.COMPLETED, Status.FAILED, Status.CANCELLED},
}

# The email each status sends; building sends none (the "code received" mail
# already says the image is built next).
EMAIL_FOR = {
    Status.RECEIVED: "received",
    Status.QUEUED: "queued",
    Status.RUNNING: "started",
    Status.COMPLETED: "finished",
    Status.FAILED: "failed",
    Status.BUILD_FAILED: "failed",
    Status.CANCELLED: "cancelled",
}


class IllegalTransition(ValueError):
    pass


def check(old: Status | str, new: Status | str) -> Status:
    old, new = Status(old), Status(new)
    if new not in TRANSITIONS.get(old, ()):
        raise IllegalTransition(f"a submission cannot go from {old} to {new}")
    return new

