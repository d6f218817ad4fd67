"""Restarts keep every submission moving, and `queued` means in Slurm (issue 24 item 6).

Seen on a fresh machine: a mail worker killed with -9, then `make run` again (the
documented restart). Every submission made before it then had group m2d, not m2d-job:
deploy/gateway.sh start ran `chown -R m2d:m2d` over the data folder, so the job account
could not read job/job.sbatch, every sbatch failed, and one submission had already moved
to queued (its e-mail sent) before its sbatch. Here the gateway runs as `make run` runs
it (deploy/gateway.sh), workers die with -9 mid-submission, it is started again the
documented way, and an admin's `chown -R` is thrown in before the next sbatch."""
import grp
import subprocess
import time

from .helpers.stack import DocumentedStack, job_zip

FOLDERS = ("", "code", "job", "export", "logs")
STATUS_MAILS = ["code received", "queued for execution", "execution started", "execution finished"]


def _groups(stack, sid):
    root = stack.run_dir / "data" / "submissions" / str(sid)
    return {folder or ".": grp.getgrgid((root / folder).stat().st_gid).gr_name for folder in FOLDERS}


def _subjects(researcher, sid):
    return [m["Subject"].split(": ", 1)[1] for m in researcher.mails(sid)]


def test_a_restart_the_documented_way_mid_submission_keeps_it_moving_and_mails_each_step_once(testbed, tmp_path):
    stack = DocumentedStack().start()
    try:
        researcher = stack.researcher("restart")  # with a dry run, as the submission had
        first = researcher.submit(job_zip(tmp_path, 1, "first.zip"))
        researcher.wait_until(first, "completed", timeout=600)
        assert set(_groups(stack, first).values()) == {"m2d-job"}

        stack.kill("worker-build")  # the second submission waits for a worker
        second = researcher.submit(job_zip(tmp_path, 2, "second.zip"))
        stack.kill("worker-mail")  # with its "code received" e-mail owed
        # an admin's chown -R (what gateway.sh start itself did on every start)
        root = stack.run_dir / "data" / "submissions" / str(second)
        subprocess.run(["chown", "-R", "m2d:m2d", str(root)], check=True, timeout=30)
        stack.restart()  # `make run` again

        # what the first processes made is still the job account's to read
        assert set(_groups(stack, first).values()) == {"m2d-job"}
        done = researcher.wait_until(second, {"completed", "failed", "dry_run_failed"}, timeout=900)
        assert done["status"] == "completed", (done["reason"], done["error"])
        assert set(_groups(stack, second).values()) == {"m2d-job"}  # repaired before its first sbatch
        moves = [e["status"] for e in done["events"]]
        assert moves == ["received", "building", "dry_run_queued", "dry_run_running", "dry_run_passed",
                         "queued", "running", "completed"]
        queued = next(e for e in done["events"] if e["status"] == "queued")
        assert queued["detail"] == f"Slurm job {done['slurm_job_id']}"  # queued with the job Slurm has

        researcher.wait_for_mails(second, 4)
        time.sleep(3)  # room for a second copy to show
        assert _subjects(researcher, first) == STATUS_MAILS
        assert _subjects(researcher, second) == STATUS_MAILS
    finally:
        stack.stop()
