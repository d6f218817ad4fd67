"""gateway/core/jobfiles.py, the one reader of what jobs wrote (issue 21): no symlink
followed at any depth, names as bytes shown escaped, FIFOs and devices never
opened for reading, a bounded walk that fails one submission, never the cycle.

Every test runs with the kernel's openat2 and with the fallback walk of
O_NOFOLLOW directory descriptors. The real stack's proofs (the symlink race,
hostile names and a 100,000-file export from a real job) are in
tests/test_sealed_outputs.py."""
import ast
import errno
import hashlib
import os
import random
import threading
import time
from pathlib import Path

import pytest

from gateway.core import airlock, jobfiles, lifecycle
from gateway.core.models import Submission
from gateway.core.storage import SubmissionFiles
from gateway.extensions import db
from m2d.contract.states import Status

from .helpers.users import make_user as _user
from .helpers.users import token_header as _token

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["openat2", "walk"])
def resolver(request, monkeypatch):
    """Both ways of opening beneath a folder: openat2, and the walk for kernels without it."""
    if request.param == "walk":
        monkeypatch.setattr(jobfiles, "_openat2_works", False)
    else:
        assert jobfiles._openat2_works, f"this kernel ({os.uname().release}) has no openat2"
    return request.param


@pytest.fixture
def ended(local_app):
    """A completed submission of a researcher, with an empty export/ and export-dryrun/."""
    submission = lifecycle.create(_user("eve@example.org"), "mine.zip")
    submission.status = Status.COMPLETED.value
    db.session.commit()
    files = SubmissionFiles(submission.id)
    for folder in (files.export, files.root / "export-dryrun", files.logs):
        folder.mkdir(parents=True, exist_ok=True)
    return submission


def _bounds(**changed):
    return jobfiles.Bounds(**{"files": 100, "depth": 8, "bytes": 10**6, "seconds": 30.0, **changed})


def _export(submission):
    return SubmissionFiles(submission.id).export


# ------------------------------------------------------------------ symlinks

def test_a_symlink_at_any_depth_is_never_followed(ended, resolver, tmp_path):
    secret = tmp_path / "dataset"
    (secret / "inner").mkdir(parents=True)
    (secret / "inner" / "patients.csv").write_text("patient,label\nP1,tumour\n")
    export = _export(ended)
    (export / "model.txt").write_text("weights\n")
    (export / "folder").symlink_to(secret)  # a folder swapped for a symlink
    (export / "deep" / "er").mkdir(parents=True)
    (export / "deep" / "er" / "file.csv").symlink_to(secret / "inner" / "patients.csv")
    (export / "environ").symlink_to("/proc/self/environ")

    listing = jobfiles.scan(ended.id, jobfiles.EXPORT, _bounds())
    assert [f.path for f in listing.files] == ["model.txt"]
    assert sorted(name for name, _ in listing.skipped) == ["deep/er/file.csv", "environ", "folder"]
    assert all("symlink" in why for _, why in listing.skipped)
    # opening by a name that goes through one fails at that component
    root = jobfiles._folder_fd(ended.id, jobfiles.EXPORT)
    try:
        for name in (b"folder/inner/patients.csv", b"deep/er/file.csv", b"environ", b"../export/model.txt"):
            with pytest.raises((OSError, jobfiles.Refused)):
                os.close(jobfiles.open_beneath(root, name, os.O_RDONLY))
    finally:
        os.close(root)
    assert jobfiles.read_head(ended.id, jobfiles.EXPORT, "folder/inner/patients.csv", 100) is None
    assert jobfiles.read_tail(ended.id, jobfiles.EXPORT, "environ", 100) is None


def test_the_folder_itself_as_a_symlink_is_refused(ended, resolver, tmp_path):
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "a.csv").write_text("P1\n")
    dry = SubmissionFiles(ended.id).root / "export-dryrun"
    dry.rmdir()
    dry.symlink_to(tmp_path / "dataset")
    with pytest.raises(jobfiles.Refused, match="cannot be opened"):
        jobfiles.scan(ended.id, jobfiles.DRY_RUN_EXPORT, _bounds())


def test_a_folder_swapped_for_a_symlink_in_a_loop_never_yields_the_target(ended, resolver, tmp_path):
    """The race of issue 21 in miniature: a thread swaps a folder and a symlink to
    a secret as fast as it can while the reader walks and reads."""
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "status").write_text("SECRET=1\n")
    export = _export(ended)
    real = export / "real"
    real.mkdir()
    (real / "status").write_text("harmless\n")
    stop = threading.Event()

    def swap():
        link, parked = export / "swap", export / "parked"
        while not stop.is_set():
            try:
                os.rename(real, link) if real.exists() else None
                os.rename(link, parked)
                os.symlink(secret, link)
                os.unlink(link)
                os.rename(parked, link)
                os.rename(link, real)
            except OSError:
                pass

    swapper = threading.Thread(target=swap, daemon=True)
    swapper.start()
    seen = set()
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            for name in ("swap/status", "real/status"):
                data = jobfiles.read_head(ended.id, jobfiles.EXPORT, name, 100)
                seen.add(data)
            try:
                listing = jobfiles.scan(ended.id, jobfiles.EXPORT, _bounds(), previews=100, preview_total=1000)
            except jobfiles.Refused:
                continue
            seen.update(f.text.encode() for f in listing.files if f.text)
    finally:
        stop.set()
        swapper.join()
    assert b"SECRET=1\n" not in seen and b"harmless\n" in seen


# ------------------------------------------------------------------ file types

def test_a_fifo_a_socket_and_a_hard_link_are_listed_as_skipped_never_read(ended, resolver):
    export = _export(ended)
    os.mkfifo(export / "pipe")
    (export / "data.txt").write_text("x\n")
    os.link(export / "data.txt", export / "twin.txt")
    os.mkfifo(SubmissionFiles(ended.id).logs / "slurm-1.err")
    started = time.monotonic()
    listing = jobfiles.scan(ended.id, jobfiles.EXPORT, _bounds())
    assert jobfiles.read_tail(ended.id, jobfiles.LOGS, "slurm-1.err", 100) is None  # would hang if opened blocking
    assert time.monotonic() - started < 30
    assert listing.files == []
    assert dict(listing.skipped) == {"pipe": "a FIFO: never read", "data.txt": "a file with 2 hard links: never read",
                                     "twin.txt": "a file with 2 hard links: never read"}


# ------------------------------------------------------------------ names

HOSTILE = [b"\xff\xfe.txt", b"a\nb", b"caf\xc3\xa9", b"x" * 250, b"...", b"..a", b"-rf", b"back\\x41slash",
           b"A", b"\\x41", b"tab\tname", b"bidi\xe2\x80\xaetxt.exe", b"c1\xc2\x85"]


def test_names_are_bytes_escaped_so_that_no_two_show_the_same_and_they_read_back(ended, resolver):
    export = os.fsencode(_export(ended))
    for i, name in enumerate(HOSTILE):
        with open(os.path.join(export, name), "wb") as f:
            f.write(str(i).encode())
    listing = jobfiles.scan(ended.id, jobfiles.EXPORT, _bounds())
    shown = {f.path: f for f in listing.files}
    assert len(shown) == len(HOSTILE) and listing.skipped == []
    assert "\\xff\\xfe.txt" in shown and "a\\x0ab" in shown and "café" in shown and "back\\\\x41slash" in shown
    assert "A" in shown and "\\\\x41" in shown and "bidi\\u202etxt.exe" in shown
    assert all("\n" not in path and "\ufffd" not in path for path in shown)
    for path, found in shown.items():  # the shown name opens the very file
        assert jobfiles.unescape(path) == found.name
        assert jobfiles.read_head(ended.id, jobfiles.EXPORT, jobfiles.unescape(path), 10) == \
            str(HOSTILE.index(found.name)).encode()


def test_escape_is_one_to_one_on_random_bytes():
    rng = random.Random(21)
    seen = {}
    for _ in range(20000):
        name = bytes(rng.choice(b"\\x0fAa\xc3\xa9\xff\n\x85\xe2\x80\xae/") for _ in range(rng.randint(1, 6)))
        text = jobfiles.escape(name)
        assert jobfiles.unescape(text) == name
        assert seen.setdefault(text, name) == name


def test_a_name_too_long_for_the_manifest_is_kept_shortened_and_never_released(client, ended, resolver):
    export = _export(ended)
    deep = export
    for _ in range(6):  # 6 x 250 bytes of \xff: 6,000 characters escaped
        deep = deep / os.fsdecode(b"\xff" * 250)
    deep.mkdir(parents=True)
    (deep / "x").write_bytes(b"1")
    (export / os.fsdecode(b"ok\xff.txt")).write_bytes(b"2")
    manifest = airlock.manifest(ended)
    assert manifest.error is None and len(manifest.files) == 2
    long = next(f for f in manifest.files if f.note)
    assert len(long.path) <= airlock.MAX_PATH and long.sha256 is None and "rename" in long.note
    odd = next(f for f in manifest.files if not f.note)
    assert odd.path == "ok\\xff.txt" and odd.sha256 == hashlib.sha256(b"2").hexdigest()


# ------------------------------------------------------------------ bounds

def test_the_walk_is_bounded_in_files_depth_bytes_and_seconds(ended, resolver):
    export = _export(ended)
    for i in range(5):
        (export / f"f{i}").write_bytes(b"x" * 10)
    (export / "a" / "b" / "c").mkdir(parents=True)
    with pytest.raises(jobfiles.Refused, match="more than 4 files and folders"):
        jobfiles.scan(ended.id, jobfiles.EXPORT, _bounds(files=4))
    with pytest.raises(jobfiles.Refused, match="more than 2 deep"):
        jobfiles.scan(ended.id, jobfiles.EXPORT, _bounds(depth=2))
    with pytest.raises(jobfiles.Refused, match="more than 30 bytes"):
        jobfiles.scan(ended.id, jobfiles.EXPORT, _bounds(bytes=30))
    with pytest.raises(jobfiles.Refused, match="longer than 0 s"):
        jobfiles.scan(ended.id, jobfiles.EXPORT, _bounds(seconds=0.0))
    assert len(jobfiles.scan(ended.id, jobfiles.EXPORT, _bounds()).files) == 5


def test_an_export_past_a_bound_fails_that_submission_with_its_reason_and_the_purge_goes_on(
        client, local_app, ended, resolver):
    local_app.config["EXPORT_MAX_FILES"] = 50
    for i in range(60):
        (_export(ended) / f"{i:03d}").write_bytes(b"")
    assert airlock.over_cap(ended.id).startswith("EXPORT_REFUSED: export/ holds more than 50 files")
    manifest = airlock.manifest(ended)
    assert "more than 50 files" in manifest.error and manifest.files == []
    answer = client.get(f"/api/v1/submissions/{ended.id}/export", headers=_token(ended.user)).json
    assert "more than 50 files" in answer["error"] and answer["file_count"] == 0
    # another submission's export past retention is still purged in the same run
    other = lifecycle.create(ended.user, "b.zip")
    other.status = Status.COMPLETED.value
    db.session.commit()
    SubmissionFiles(other.id).export.mkdir(parents=True)
    (SubmissionFiles(other.id).export / "r.txt").write_text("1")
    later = db.session.get(Submission, other.id).updated_at.replace(year=2099)
    airlock.purge(later)
    airlock.purge(later.replace(month=12, day=31))
    assert not (SubmissionFiles(other.id).export / "r.txt").exists()


def test_a_directory_of_a_million_names_is_refused_after_reading_the_bound(ended, resolver):
    export = os.fsencode(_export(ended))
    for i in range(3000):
        os.close(os.open(os.path.join(export, b"%05d" % i), os.O_CREAT | os.O_WRONLY, 0o600))
    started = time.monotonic()
    with pytest.raises(jobfiles.Refused):
        jobfiles.scan(ended.id, jobfiles.EXPORT, _bounds(files=100))
    assert time.monotonic() - started < 2


def test_delete_follows_no_symlink(ended, resolver, tmp_path):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "precious").write_text("1")
    export = _export(ended)
    (export / "link").symlink_to(keep)
    (export / "d").mkdir()
    (export / "d" / "inner").symlink_to(keep / "precious")
    assert jobfiles.remove_all(ended.id, jobfiles.EXPORT) == []
    assert os.listdir(export) == [] and (keep / "precious").read_text() == "1"


def test_eacces_on_a_file_lists_it_unreadable_never_fails(ended, resolver):
    (_export(ended) / "closed").write_bytes(b"1")
    calls = []
    real = jobfiles._open_regular

    def denied(dir_fd, name):
        calls.append(name)
        raise PermissionError(errno.EACCES, "Permission denied")
    jobfiles._open_regular = denied
    try:
        listing = jobfiles.scan(ended.id, jobfiles.EXPORT, _bounds())
    finally:
        jobfiles._open_regular = real
    assert calls == [b"closed"] and [(f.path, f.sha256) for f in listing.files] == [("closed", None)]


# ------------------------------------------------------------------ one reader

# Where code outside gateway/core/jobfiles.py may name a job's folders: to make them
# (storage, the prepare) or to hand them to Slurm's batch script; never to read.
# folders: the folders themselves, to make and repair (group, mode), never what is in them
ALLOWED = {("gateway/core/storage.py", "create"), ("gateway/core/storage.py", "folders"),
           ("gateway/core/workflow.py", "_submit"), ("gateway/core/workflow.py", "_dry_run_export"),
           ("gateway/core/disclosure_job.py", "_write_job")}  # the report job's binds: export ro, logs
JOB_FOLDER_ATTRIBUTES = {"export", "logs", "DRY_RUN_EXPORT", "EXPORT", "LOGS", "DISCLOSURE"}
JOB_FOLDER_WORDS = ("export-dryrun", "/mnt/export")


def _prose(text: str) -> bool:
    """A message or help text that names a folder (a limit, a reason), not a path to open."""
    return "\n" in text or " " in text


def _uses(path: Path):
    """(function, what) for each place in ``path`` that names a job's folder."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)}

    def visit(node, function):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        if isinstance(node, ast.Attribute) and node.attr in JOB_FOLDER_ATTRIBUTES and not (
                isinstance(node.value, ast.Name) and node.value.id == "jobfiles"):
            yield function, f".{node.attr}"
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings \
                and any(word in node.value for word in JOB_FOLDER_WORDS) and not _prose(node.value):
            yield function, repr(node.value)
        for child in ast.iter_child_nodes(node):
            yield from visit(child, function)
    yield from visit(tree, "<module>")


def test_nothing_but_jobfiles_opens_what_jobs_wrote():
    """Every reference to export/, export-dryrun/ or logs/ outside gateway/core/jobfiles.py
    is in a function that makes the folders or hands them to the batch script;
    reading goes through jobfiles (by submission, folder and name)."""
    found = set()
    for path in sorted([*REPO.glob("gateway/**/*.py"), *REPO.glob("jobs/*.py")]):
        rel = path.relative_to(REPO).as_posix()
        if rel in ("gateway/core/jobfiles.py", "gateway/core/jobscript.py") or "/migrations/" in rel:
            continue  # the batch script's template values name the folders the job writes
        for function, what in _uses(path):
            found.add((rel, function, what))
    strays = sorted(f for f in found if (f[0], f[1]) not in ALLOWED)
    assert strays == [], "read what jobs wrote only through gateway.core.jobfiles: " + repr(strays)


def test_the_one_reader_check_finds_a_stray_read(tmp_path):
    stray = tmp_path / "stray.py"
    stray.write_text("def tail(files):\n    return (files.logs / 'slurm-1.err').read_text()\n")
    assert list(_uses(stray)) == [("tail", ".logs")]


def test_what_jobs_wrote_becomes_text_a_database_keeps():
    assert jobfiles.text_of(b"ok\x00\xff\n") == "ok\ufffd\ufffd\n"
