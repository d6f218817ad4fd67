"""The life of a submission, written down once.

Every part of the system (workers, poller, web pages, API, emails) moves a
submission only along TRANSITIONS; ``gateway.core.lifecycle.advance`` enforces it.
"""
from enum import Enum


class Status(str, Enum):
    RECEIVED = "received"
    BUILDING = "building"
    # the dry run: the same job on the synthetic twin of CLaM, full logs
    DRY_RUN_QUEUED = "dry_run_queued"
    DRY_RUN_RUNNING = "dry_run_running"
    DRY_RUN_PASSED = "dry_run_passed"
    DRY_RUN_FAILED = "dry_run_failed"
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


TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.BUILD_FAILED, Status.CANCELLED,
                      Status.DRY_RUN_FAILED})
# Slurm has the dry run's job (Submission.dry_run_job_id) in these
DRY_RUN_ACTIVE = frozenset({Status.DRY_RUN_QUEUED, Status.DRY_RUN_RUNNING})

TRANSITIONS = {
    # failed: its prepare kept failing before the build began (gateway.core.alerts)
    Status.RECEIVED: {Status.BUILDING, Status.FAILED, Status.CANCELLED},
    # failed: Slurm refused the job (bad partition, limits), so it never queued
    # queued: dry runs are off (globally or for this researcher); dry_run_queued:
    # the dry run went to Slurm first
    Status.BUILDING: {Status.DRY_RUN_QUEUED, Status.QUEUED, Status.BUILD_FAILED, Status.FAILED,
                      Status.CANCELLED},
    Status.DRY_RUN_QUEUED: {Status.DRY_RUN_RUNNING, Status.DRY_RUN_FAILED, Status.CANCELLED},
    Status.DRY_RUN_RUNNING: {Status.DRY_RUN_PASSED, Status.DRY_RUN_FAILED, Status.CANCELLED},
    # only a dry run that exited 0 lets the real job go to Slurm; failed: Slurm
    # refused the real job
    Status.DRY_RUN_PASSED: {Status.QUEUED, Status.FAILED, Status.CANCELLED},
    # a job can fail or be cancelled before it ever ran (NODE_FAIL, scancel)
    Status.QUEUED: {Status.RUNNING, Status.FAILED, Status.CANCELLED},
    Status.RUNNING: {Status.COMPLETED, Status.FAILED, Status.CANCELLED},
}

# The email each status sends; building sends none (the "code received" mail
# already says the image is built next), nor do the dry run's steps but its
# failure (the researcher sees them on the page; "queued for execution" says
# the dry run passed).
EMAIL_FOR = {
    Status.RECEIVED: "received",
    Status.QUEUED: "queued",
    Status.RUNNING: "started",
    Status.COMPLETED: "finished",
    Status.FAILED: "failed",
    Status.BUILD_FAILED: "failed",
    Status.CANCELLED: "cancelled",
    Status.DRY_RUN_FAILED: "dry_run_failed",
}


class IllegalTransition(ValueError):
    pass


def check(old: Status | str, new: Status | str) -> Status:
    old, new = Status(old), Status(new)
    if new not in TRANSITIONS.get(old, ()):
        raise IllegalTransition(f"a submission cannot go from {old} to {new}")
    return new

