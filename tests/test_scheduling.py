"""tests/helpers/scheduling.py: which tests each xdist worker gets, driven through
the scheduler's own calls by a simulated run (workers that run a test only once
they know the next, as xdist's do)."""
from types import SimpleNamespace

from xdist.scheduler import LoadGroupScheduling

from .helpers.scheduling import LongestFirst, take_front

WORKERS = 4


class Worker:
    def __init__(self, name):
        self.gateway = SimpleNamespace(id=name)
        self.shutting_down = False
        self.held = []  # collection indices sent and not yet finished

    def send_runtest_some(self, indices):
        self.held.extend(indices)

    def shutdown(self):
        self.shutting_down = True

    def can_run(self):
        return len(self.held) >= 2 or (self.held and self.shutting_down)


def started(scheduler_class, collection):
    """A scheduler of WORKERS workers that collected ``collection``, after its first hand-out."""
    config = SimpleNamespace(option=SimpleNamespace(loadscopereorder=True),
                             getvalue=lambda name: [f"{WORKERS}*popen"] if name == "tx" else None)
    scheduler = scheduler_class(config)
    workers = [Worker(f"gw{i}") for i in range(WORKERS)]
    for worker in workers:
        scheduler.add_node(worker)
        scheduler.add_node_collection(worker, collection)
    scheduler.schedule()
    return scheduler, workers


def simulate(scheduler_class, seconds):
    """Run tests of ``seconds`` (node id -> s, in the queue's order) on WORKERS
    simulated workers; (when the last ends, which worker ran which ids)."""
    collection = list(seconds)
    scheduler, workers = started(scheduler_class, collection)
    now, ran, running = 0.0, {w.gateway.id: [] for w in workers}, {}
    while True:
        for worker in workers:
            if worker not in running and worker.can_run():
                index = worker.held[0]
                running[worker] = now + seconds[collection[index]]
                ran[worker.gateway.id].append(collection[index])
        if not running:
            return now, ran
        worker = min(running, key=running.get)
        now = running.pop(worker)
        scheduler.mark_test_complete(worker, worker.held.pop(0))


LONG = (243, 171, 165, 163, 131, 116, 95, 72)  # the suite's longest on a fresh machine (2026-12-07)


def suite():
    """The long tests first (as conftest orders them), then 100 short ones."""
    tests = {f"tests/test_long.py::test_{i}": float(s) for i, s in enumerate(LONG)}
    tests.update({f"tests/test_short.py::test_{i}": 2.0 for i in range(100)})
    return tests


def test_each_worker_holds_one_long_test_and_a_short_one_to_follow_it():
    collection = list(suite())
    scheduler, workers = started(LongestFirst, collection)
    assert scheduler.config.option.loadscopereorder is False  # conftest's order, not xdist's
    held = [[collection[i].split("::")[0] for i in worker.held] for worker in workers]
    assert held == [["tests/test_long.py", "tests/test_short.py"]] * WORKERS


def test_the_long_tests_spread_over_the_workers_where_xdists_own_scheduler_pairs_them():
    ours, ran = simulate(LongestFirst, suite())
    xdists, xdist_ran = simulate(LoadGroupScheduling, suite())
    first_two = [names[:3:2] for names in ran.values()]  # a short test between two long ones
    assert all(all("test_long" in name for name in names) for names in first_two)
    assert any(all("test_long" in name for name in names[:2]) for names in xdist_ran.values())
    # no schedule ends before every test's share of the workers (339 s), nor before the
    # longest and the shortest long one after it would (315 s, each long test starting
    # on the first worker free); xdist's puts the two longest of five after each other
    bound = max(sum(suite().values()) / WORKERS, LONG[0] + LONG[-1])
    assert ours < 1.05 * bound
    assert xdists > 1.05 * 1.05 * bound


def test_a_worker_takes_the_front_when_empty_or_after_a_short_test():
    assert take_front(0, last_from_front=True)
    assert take_front(0, last_from_front=False)
    assert not take_front(1, last_from_front=True)
    assert take_front(1, last_from_front=False)
