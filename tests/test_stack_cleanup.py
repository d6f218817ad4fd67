"""The test stack's cleanup after a process it killed with -9: what that
process left in its group is killed, and nothing that took its numbers since
(pids wrap within minutes in the parallel suite, and a Slurm job's batch
shell, the leader of a group of its own, once got such a number and died)."""
import subprocess

from .helpers.stack import _processes_in_group, kill_processes, left_in_group


def test_the_processes_left_in_a_group_are_killed_and_a_new_process_with_a_reused_pid_is_not():
    leader = subprocess.Popen(["bash", "-c", "sleep 60 & sleep 60 & wait"], start_new_session=True)
    try:
        for _ in range(100):
            members = _processes_in_group(leader.pid)
            if len(members) == 3:
                break
            subprocess.run(["sleep", "0.05"], check=True)
        assert {pid for pid, _ in members} >= {leader.pid} and len(members) == 3, members
        left = left_in_group(leader.pid)
        assert sorted(left) == sorted(m for m in members if m[0] != leader.pid)

        # the same pids, started at another time: other processes now; untouched
        kill_processes([(pid, str(int(started) + 1)) for pid, started in left])
        assert len(_processes_in_group(leader.pid)) == 3

        kill_processes(left)
        for _ in range(100):
            if [pid for pid, _ in _processes_in_group(leader.pid)] == [leader.pid]:
                break
            subprocess.run(["sleep", "0.05"], check=True)
        assert [pid for pid, _ in _processes_in_group(leader.pid)] == [leader.pid]
    finally:
        leader.kill()
        leader.wait(timeout=10)
