"""How `make test`'s pytest-xdist workers get their tests (``--dist loadgroup``).

An xdist worker runs a test only once it knows the one after it (its teardown
depends on it), so every worker holds two: the one it runs and the next. xdist's
own loadgroup scheduler tops a worker up to three and takes each from the front of
its queue, which conftest orders longest first: the three longest tests of the
suite went to one worker, one after the other, and the run ended with one worker
busy and three idle. Here a worker holds two, and the one it holds next is taken
from the back of the queue (a short test) when what it runs came from the front,
and from the front when it came from the back: each worker, as it comes free,
starts the longest test left, as in longest-processing-time-first scheduling.

xdist's reordering of the queue by the number of tests per group
(``--loadscope-reorder``, its default) is turned off, so conftest's order holds.
"""
from xdist.scheduler import LoadGroupScheduling

HELD = 2  # the test a worker runs and the one after it


class LongestFirst(LoadGroupScheduling):
    def __init__(self, config, log=None):
        config.option.loadscopereorder = False
        super().__init__(config, log)
        self.took_front = {}  # node -> whether its last unit came from the queue's front

    def _reschedule(self, node):
        if node.shutting_down:
            return
        if not self.workqueue:
            node.shutdown()
            return
        if self._pending_of(self.assigned_work[node]) < HELD:
            self._assign_work_unit(node)

    def _assign_work_unit(self, node):
        """xdist's own hand-out of the queue's first unit, the last one brought to the front first."""
        front = take_front(self._pending_of(self.assigned_work.get(node, {})), self.took_front.get(node, False))
        self.took_front[node] = front
        if not front:
            self.workqueue.move_to_end(next(reversed(self.workqueue)), last=False)
        super()._assign_work_unit(node)


def take_front(pending: int, last_from_front: bool) -> bool:
    """Whether a worker holding ``pending`` tests gets the longest unit left (the
    queue's front) rather than the shortest (its back): the longest when it holds
    nothing, or when what it runs now is a short one; a short one to follow a long one."""
    return pending == 0 or not last_from_front
