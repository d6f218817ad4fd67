import pytest

from gateway.core.templating import MAIL_DIR
from m2d.contract.states import EMAIL_FOR, TERMINAL, TRANSITIONS, IllegalTransition, Status, check


def test_happy_path_is_allowed_in_order():
    path = [Status.RECEIVED, Status.BUILDING, Status.QUEUED, Status.RUNNING, Status.COMPLETED]
    for old, new in zip(path, path[1:]):
        assert check(old, new) == new


def test_happy_path_with_a_dry_run_first_is_allowed_in_order():
    path = [Status.RECEIVED, Status.BUILDING, Status.DRY_RUN_QUEUED, Status.DRY_RUN_RUNNING,
            Status.DRY_RUN_PASSED, Status.QUEUED, Status.RUNNING, Status.COMPLETED]
    for old, new in zip(path, path[1:]):
        assert check(old, new) == new


def test_only_a_passed_dry_run_lets_the_real_job_queue():
    for status in Status:
        if Status.QUEUED in TRANSITIONS.get(status, ()):
            assert status in (Status.BUILDING, Status.DRY_RUN_PASSED), status
    # a failed dry run ends the submission: the real job is never submitted
    assert Status.DRY_RUN_FAILED in TERMINAL
    with pytest.raises(IllegalTransition, match="from dry_run_failed to queued"):
        check(Status.DRY_RUN_FAILED, Status.QUEUED)
    with pytest.raises(IllegalTransition):
        check(Status.DRY_RUN_RUNNING, Status.QUEUED)  # it must pass first
    with pytest.raises(IllegalTransition):
        check(Status.DRY_RUN_QUEUED, Status.DRY_RUN_PASSED)  # it must run first
    # Slurm may refuse the real job after the dry run passed
    assert Status.FAILED in TRANSITIONS[Status.DRY_RUN_PASSED]


@pytest.mark.parametrize("old", sorted(TERMINAL))
def test_terminal_states_never_move(old):
    for new in Status:
        with pytest.raises(IllegalTransition):
            check(old, new)


def test_skipping_a_step_is_refused():
    with pytest.raises(IllegalTransition, match="from received to running"):
        check(Status.RECEIVED, Status.RUNNING)
    with pytest.raises(IllegalTransition):
        check("queued", "completed")  # must pass through running: "started" comes first


def test_failures_and_cancellation_are_reachable():
    assert Status.BUILD_FAILED in TRANSITIONS[Status.BUILDING]
    assert Status.FAILED in TRANSITIONS[Status.QUEUED]  # e.g. NODE_FAIL before it ran
    assert all(Status.CANCELLED in targets for targets in TRANSITIONS.values())


# Deliberately silent: building ("code received" already says the environment
# is built next) and the dry run's steps but its failure (the page shows them;
# "queued for execution" says the dry run passed).
SILENT = {Status.BUILDING, Status.DRY_RUN_QUEUED, Status.DRY_RUN_RUNNING, Status.DRY_RUN_PASSED}


def test_every_user_visible_state_has_an_email_with_a_template():
    for status in Status:
        if status in SILENT:
            assert status not in EMAIL_FOR
        else:
            assert status in EMAIL_FOR, f"{status} sends no email"
            assert (MAIL_DIR / f"{EMAIL_FOR[status]}.txt").is_file()
    assert EMAIL_FOR[Status.RECEIVED] == "received"
    assert EMAIL_FOR[Status.QUEUED] == "queued"
    assert EMAIL_FOR[Status.RUNNING] == "started"
    assert EMAIL_FOR[Status.COMPLETED] == "finished"
    assert EMAIL_FOR[Status.FAILED] == EMAIL_FOR[Status.BUILD_FAILED] == "failed"
    assert EMAIL_FOR[Status.CANCELLED] == "cancelled"
    assert EMAIL_FOR[Status.DRY_RUN_FAILED] == "dry_run_failed"
