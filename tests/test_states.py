import pytest

from gateway.states import EMAIL_FOR, TERMINAL, TRANSITIONS, IllegalTransition, Status, check
from gateway.templating import MAIL_DIR


def test_happy_path_is_allowed_in_order():
    path = [Status.RECEIVED, Status.BUILDING, Status.QUEUED, Status.RUNNING, Status.COMPLETED]
    for old, new in zip(path, path[1:]):
        assert check(old, new) == new


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


# building is the one step a researcher is not mailed about: "code received"
# already says the environment is built next.
SILENT = {Status.BUILDING}


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
