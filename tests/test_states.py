import pytest

from gateway.states import EMAIL_FOR, TERMINAL, TRANSITIONS, IllegalTransition, Status, check


def test_happy_path_is_allowed_in_order():
    path = [Status.RECEIVED, Status.BUILDING, Status.QUEUED, Status.RUNNING, Status.COMPLETED]
    for old, new in zip(path, path[1:]):
        assert check(old, new) == new
        assert old.rank < new.rank


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


def test_every_user_visible_state_has_an_email():
    assert EMAIL_FOR[Status.RECEIVED] == "received"
    assert EMAIL_FOR[Status.QUEUED] == "queued"
    assert EMAIL_FOR[Status.RUNNING] == "started"
    assert EMAIL_FOR[Status.COMPLETED] == "finished"
    assert EMAIL_FOR[Status.FAILED] == EMAIL_FOR[Status.BUILD_FAILED] == "failed"
    assert Status.BUILDING not in EMAIL_FOR
