"""Issue 21's proofs on the real stack: what a job writes is read by the gateway
once, after the job ended, through gateway/core/jobfiles.py alone, and the gateway
account cannot read the dataset at all.

- The symlink race that won before (a dry run swapping folders for symlinks to
  the dataset and to /proc/self while the API was polled: 459 polls in 70 s got
  the real CSVs and /proc/self/status back) now gets nothing, during the run nor
  from the manifest after it.
- Hostile names (not UTF-8, 250 bytes, newlines, dots, backslashes), a FIFO and
  symlinks in an export: listed escaped or skipped, never followed nor opened
  for reading; a file with a non-UTF-8 name is still released and downloaded.
- 100,000 files in an export: that submission fails with the reason, the poll
  cycle goes on moving the others.
- The owner sees counts until reviewers release files.
"""
import errno
import os
import subprocess
import sys
import threading
from urllib.parse import quote

import requests

from gateway.core.models import Export
from gateway.extensions import db

from .helpers.manifest import reviewers_manifest
from .helpers.stack import AS_GATEWAY, SAMPLES, wait_for, zip_folder

FINAL = {"completed", "failed", "build_failed", "dry_run_failed", "cancelled"}
JOB_USER = os.environ.get("M2D_JOB_USER", "m2d-job")
# what must never come back: /proc/self/status and environ of a gateway
# process, and the first line of the real dataset's CSV
LEAKS = ("Uid:\t", "TracerPid", "M2D_SECRET", "M2D_MLFLOW_ADMIN", "Patient_Id")


def _open_as(user, path):
    """errno of opening ``path`` for reading as ``user`` (0: it opened)."""
    code = f"import os,sys\ntry:\n os.close(os.open({str(path)!r}, os.O_RDONLY))\nexcept OSError as e:\n sys.exit(e.errno)"
    return subprocess.run(["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--",
                           sys.executable, "-c", code], timeout=30).returncode


def test_the_gateway_account_cannot_read_the_dataset_but_jobs_can(testbed):
    dataset = testbed["env"]["M2D_DATASET_DIR"]
    csv = os.path.join(dataset, "clam-details-image.csv")
    assert _open_as(AS_GATEWAY[1].split("=", 1)[1], csv) == errno.EACCES
    assert _open_as(AS_GATEWAY[1].split("=", 1)[1], dataset) == errno.EACCES  # not even its listing
    assert _open_as(JOB_USER, csv) == 0


# ------------------------------------------------------------------ the symlink race

RACE = '''import os, sys, time
DRY = os.environ.get("M2D_DRY_RUN") == "1"
OUT = "/mnt/export"
# host paths, as the gateway would resolve them: the real dataset and the gateway's own process
TARGETS = {{"d": "/proc/self", "e": {dataset!r}}}
for name in TARGETS:
    os.makedirs(f"{{OUT}}/{{name}}-real", exist_ok=True)
    with open(f"{{OUT}}/{{name}}-real/status", "w") as f:
        f.write("harmless\\n")
with open(f"{{OUT}}/keep.txt", "w") as f:
    f.write("kept\\n")
swaps, end = 0, time.time() + ({seconds} if DRY else {real_seconds})
while time.time() < end:
    for name, target in TARGETS.items():
        link = f"{{OUT}}/{{name}}"
        os.rename(f"{{OUT}}/{{name}}-real", link)          # a real folder ...
        time.sleep(0.001)
        os.rename(link, f"{{OUT}}/{{name}}-real")
        os.symlink(target, link)                          # ... swapped for a symlink
        time.sleep(0.001)
        os.unlink(link)
    os.symlink("/proc/self/environ", f"{{OUT}}/environ.tmp")
    os.replace(f"{{OUT}}/environ.tmp", f"{{OUT}}/environ")    # a file that is a symlink half the time
    with open(f"{{OUT}}/environ.tmp", "w") as f:
        f.write("harmless\\n")
    os.replace(f"{{OUT}}/environ.tmp", f"{{OUT}}/environ")
    swaps += 1
# leave them as symlinks for the read after the end
for name, target in TARGETS.items():
    os.symlink(target, f"{{OUT}}/{{name}}")
    os.symlink(target, f"{{OUT}}/{{name}}-real/inner")
os.symlink("/proc/self/environ", f"{{OUT}}/environ.tmp")
os.replace(f"{{OUT}}/environ.tmp", f"{{OUT}}/environ")
print("m2d test: swapped", swaps, "times")
'''


def test_a_job_swapping_folders_for_symlinks_to_the_dataset_and_proc_self_gets_nothing_back(stack, app, tmp_path):
    """The race of issue 21, as long as it took to win before (70 s of a dry run,
    polled by four clients without pause), then the real job's manifest over the
    same tricks."""
    researcher = stack.researcher("racer")
    code = RACE.format(dataset=stack.env["M2D_DATASET_DIR"], seconds=70, real_seconds=15)
    submission_id = researcher.submit(zip_folder(SAMPLES / "fails", tmp_path / "race.zip", extra={"main.py": code}))
    url = f"{researcher.url}/api/v1/submissions/{submission_id}"
    seen = {"polls": 0, "racing_polls": 0, "errors": [], "leaked": [], "status": None}
    done = threading.Event()

    def poll():
        session = requests.Session()
        session.headers.update(researcher.session.headers)
        while not done.is_set():
            answer = session.get(url, timeout=60)
            seen["polls"] += 1
            if answer.status_code != 200:
                seen["errors"].append(answer.status_code)
                continue
            seen["leaked"] += [word for word in LEAKS if word in answer.text]
            seen["status"] = answer.json()["status"]
            seen["racing_polls"] += seen["status"] == "dry_run_running"
            if seen["status"] in FINAL:
                done.set()
    pollers = [threading.Thread(target=poll, daemon=True) for _ in range(4)]
    for thread in pollers:
        thread.start()
    done.wait(900)
    done.set()
    for thread in pollers:
        thread.join(60)
    print(f"race: {seen['polls']} polls, {seen['racing_polls']} while the dry run swapped")
    assert seen["errors"] == [] and seen["leaked"] == [], (seen["errors"][:5], seen["leaked"][:5])
    assert seen["racing_polls"] >= 459, f"only {seen['racing_polls']} polls during the race"

    result = researcher.submission(submission_id)
    assert result["status"] == "completed", result
    dry = result["dry_run"]
    assert "m2d test: swapped" in dry["log"]
    shown = {f["path"]: f for f in dry["export"]}
    assert shown["keep.txt"]["text"] == "kept\n" and shown["d-real/status"]["text"] == "harmless\n"
    for name in ("d", "e", "environ", "d-real/inner", "e-real/inner"):
        assert "symlink" in shown[name]["skipped"], shown[name]
    assert not [word for word in LEAKS if word in str(result)]

    # the real export, after its job: the same tricks are skipped, never followed
    paths = sorted(reviewers_manifest(submission_id))
    assert db.session.get(Export, submission_id).error is None
    assert paths == ["d-real/status", "e-real/status", "keep.txt"], paths
    owner = researcher.api("GET", f"/submissions/{submission_id}/export").json()
    assert owner["file_count"] == 3 and owner["files"] == []


# ------------------------------------------------------------------ hostile names, FIFOs, symlinks

HOSTILE = r'''import os
OUT = b"/mnt/export"
names = [b"\xff\xfe-not-utf8.bin", b"\\xff\\xfe-not-utf8.bin", b"x" * 250, b"line\nbreak.txt", b"...", b"..\n..",
         b"caf\xc3\xa9.txt"]
for i, name in enumerate(names):
    with open(OUT + b"/" + name, "wb") as f:
        f.write(b"payload-%d\n" % i)
deep = OUT
for level in range(5):  # 5 x 250 bytes: a path longer than the database column
    deep += b"/" + bytes([0x61 + level]) * 250
os.makedirs(deep)
with open(deep + b"/deep.txt", "wb") as f:
    f.write(b"deep\n")
os.mkfifo(OUT + b"/pipe")
os.symlink(b"/etc/passwd", OUT + b"/passwd")
os.symlink(b"/proc/self", OUT + b"/self")
print("m2d test: wrote", len(names), "hostile names")
'''

SHOWN = {"\\xff\\xfe-not-utf8.bin": b"payload-0\n", "\\\\xff\\\\xfe-not-utf8.bin": b"payload-1\n",
         "x" * 250: b"payload-2\n", "line\\x0abreak.txt": b"payload-3\n", "...": b"payload-4\n",
         "..\\x0a..": b"payload-5\n", "café.txt": b"payload-6\n"}


def test_hostile_names_a_fifo_and_symlinks_are_shown_escaped_or_skipped_and_a_non_utf8_name_is_released(
        stack, app, tmp_path):
    researcher = stack.researcher("names")
    submission_id = researcher.submit(zip_folder(SAMPLES / "fails", tmp_path / "names.zip",
                                                 extra={"main.py": HOSTILE}))
    result = researcher.wait_until(submission_id, FINAL)
    assert result["status"] == "completed", result
    # the dry run's export: everything, escaped (it ran on the twin)
    dry = {f["path"]: f for f in result["dry_run"]["export"]}
    for path, data in SHOWN.items():
        assert dry[path]["size"] == len(data), path
    # the export image's copy-out leaves FIFOs behind; jobfiles skips any that
    # reach the folder (test_jobfiles proves that layer alone)
    assert "pipe" not in dry or "FIFO" in dry["pipe"]["skipped"]
    assert "symlink" in dry["passwd"]["skipped"]
    assert "symlink" in dry["self"]["skipped"]
    assert not any("\n" in path or "\ufffd" in path for path in dry)

    # the real manifest (the reviewers'): the same names, a deep one kept shortened
    files = reviewers_manifest(submission_id)
    assert set(SHOWN) <= set(files) and len(files) == len(SHOWN) + 1, sorted(files)
    deep = next(f for p, f in files.items() if p not in SHOWN)
    assert deep.sha256 is None and "rename" in deep.note and len(deep.path) <= 1024
    # the owner: how many, never the names
    owner = researcher.api("GET", f"/submissions/{submission_id}/export")
    assert owner.json()["file_count"] == len(SHOWN) + 1 and owner.json()["files"] == []
    assert "not-utf8" not in owner.text and "payload" not in owner.text
    assert "not-utf8" not in researcher.api("GET", f"/submissions/{submission_id}/provenance").text

    # released by two reviewers, the non-UTF-8 name downloads with its bytes
    request = researcher.api("POST", f"/submissions/{submission_id}/release-requests",
                             json={"justification": "the .bin files"})
    assert request.status_code == 201, request.text
    wanted = "\\xff\\xfe-not-utf8.bin"
    for name in ("rev-a", "rev-b"):
        reviewer = stack.researcher(name)
        stack.flask("users", "grant-reviewer", reviewer.address)
        stack.flask("releases", "approve", str(request.json()["id"]), "--reviewer", reviewer.address,
                    "--path", wanted, "--comment", "fine")
    download = researcher.api("GET", f"/submissions/{submission_id}/export/{quote(wanted)}")
    assert download.status_code == 200 and download.content == SHOWN[wanted], download.text
    owner = researcher.api("GET", f"/submissions/{submission_id}/export").json()
    assert [f["path"] for f in owner["files"]] == [wanted]


# ------------------------------------------------------------------ a bounded walk

MANY = '''import os
n = 100_000 if os.environ.get("M2D_DRY_RUN") != "1" else 3
for i in range(n):
    os.close(os.open(f"/mnt/export/f{i:06d}", os.O_CREAT | os.O_WRONLY, 0o640))
print("m2d test: wrote", n, "files")
'''
QUICK = '''print("m2d test: quick")
'''


def test_an_export_of_100000_files_fails_its_submission_with_the_reason_and_the_cycle_goes_on(stack, tmp_path):
    researcher = stack.researcher("many", dry_run=False)
    many = researcher.submit(zip_folder(SAMPLES / "fails", tmp_path / "many.zip", extra={"main.py": MANY}))
    quick = researcher.submit(zip_folder(SAMPLES / "fails", tmp_path / "quick.zip", extra={"main.py": QUICK}))
    assert researcher.wait_until(quick, FINAL)["status"] == "completed"
    result = researcher.wait_until(many, FINAL)
    assert result["status"] == "failed", result
    # the export image stops the job first (its own verdict names the limit); what the
    # full image held (a few dozen inodes over) is still more than the gateway's walk takes
    assert result["reason"].startswith("EXPORT_FULL: /mnt/export is over its limit of 2 GiB / 10,000 files"), result
    owner = researcher.api("GET", f"/submissions/{many}/export").json()
    assert "more than 10000 files" in owner["error"] and owner["file_count"] == 0
    # the poller is alive and still moving submissions after it
    again = researcher.submit(zip_folder(SAMPLES / "fails", tmp_path / "again.zip", extra={"main.py": QUICK}))
    assert researcher.wait_until(again, FINAL)["status"] == "completed"
    mail = wait_for(lambda: [m for m in researcher.mails(many) if "failed" in m["Subject"]], 120, "the failure email")
    assert "10,000 files" in mail[-1].get_content()
