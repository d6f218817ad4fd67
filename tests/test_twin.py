"""The synthetic twin per dataset version (m2d/contract/twin.py): made once by the
toolkit's generator, atomically, readable by the job account whatever the
maker's umask; the gateway records the version each submission ran on and
binds that version's twin in its dry run."""
import os
import threading
import uuid
from pathlib import Path

import pytest

from gateway import accounts, create_app, lifecycle
from gateway.config import ConfigError
from gateway.extensions import db
from gateway.models import Submission, utcnow
from jobs import tasks
from m2d.contract import sample_data, twin


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_a_twin_is_made_once_per_version_with_that_versions_parameters(tmp_path):
    made = twin.ensure(tmp_path, "2026-03")
    assert made == tmp_path / "2026-03" and sample_data.is_complete(made)
    chosen = twin.parameters("2026-03")
    sample_data.generate(tmp_path / "by-hand", cases=chosen.cases, size=chosen.size, seed=chosen.seed)
    assert _files(made) == _files(tmp_path / "by-hand")  # the generator, with the version's parameters
    before = {p: p.stat().st_mtime_ns for p in made.rglob("*")}
    assert twin.ensure(tmp_path, "2026-03") == made  # again: left as it is
    assert {p: p.stat().st_mtime_ns for p in made.rglob("*")} == before
    other = twin.ensure(tmp_path, "2")
    assert _files(other) != _files(made)  # another version, another twin
    assert len(sample_data.read_csv(other / sample_data.CASE_CSV)) == twin.CASES


def test_twins_asked_for_at_once_are_made_once_and_leave_no_half_made_folder(tmp_path):
    results = []
    threads = [threading.Thread(target=lambda: results.append(twin.ensure(tmp_path, "1"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [tmp_path / "1"] * 4 and sample_data.is_complete(tmp_path / "1")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".1.lock", "1"]  # no temporary folder left


def test_a_twin_is_readable_by_everyone_whatever_the_makers_umask(tmp_path):
    old = os.umask(0o077)
    try:
        made = twin.ensure(tmp_path, "1")
    finally:
        os.umask(old)
    modes = {p.stat().st_mode & 0o777 for p in [made, *made.rglob("*")]}
    assert modes == {0o755, 0o644}


@pytest.mark.parametrize("version", ["", "../clam", "a/b", ".hidden", "x" * 65, "v 1"])
def test_a_version_that_cannot_name_a_folder_is_refused_saying_what_can(tmp_path, version):
    with pytest.raises(ValueError, match="letters, digits and"):
        twin.ensure(tmp_path, version)


def test_the_gateway_refuses_a_bad_dataset_version_at_start(tmp_path):
    from gateway import create_app
    with pytest.raises(ConfigError, match="M2D_DATASET_VERSION"):
        create_app({"TESTING": True, "DATA_DIR": str(tmp_path), "DATASET_VERSION": "../clam"})


def _submission():
    user = accounts.create_user(f"twin-{uuid.uuid4().hex[:6]}@example.org", "Twin")
    submission = lifecycle.create(user, "submission.zip")
    db.session.commit()
    return submission


def test_a_submission_records_the_dataset_version_it_first_ran_on_and_keeps_it(local_app, tmp_path):
    local_app.config.update(DATASET_VERSION="2026-03", TWIN_DIR=str(tmp_path / "twins"))
    submission = _submission()
    assert tasks._dataset_version(submission) == "2026-03"
    assert tasks._twin("2026-03") == tmp_path / "twins" / "2026-03"
    assert sample_data.is_complete(tmp_path / "twins" / "2026-03")  # made on first use
    local_app.config["DATASET_VERSION"] = "2026-04"  # the admins moved on between its dry run and real run
    db.session.expire_all()
    assert tasks._dataset_version(db.session.get(Submission, submission.id)) == "2026-03"
    assert db.session.get(Submission, submission.id).to_dict()["dataset_version"] == "2026-03"


def test_the_twins_live_under_the_data_folder_unless_told_otherwise(tmp_path, monkeypatch):
    monkeypatch.delenv("M2D_TWIN_DIR", raising=False)  # the testbed's gateway.env names one
    monkeypatch.delenv("M2D_DATASET_VERSION", raising=False)
    local_app = create_app({"TESTING": True, "DATA_DIR": str(tmp_path / "data"), "SLURM_ACCOUNTS": False})
    assert local_app.config["TWIN_DIR"] == os.path.join(local_app.config["DATA_DIR"], "twins")
    assert local_app.config["DATASET_VERSION"] == twin.DEFAULT_VERSION


def test_the_status_page_shows_the_dataset_version(local_app, client):
    submission = _submission()
    submission.dataset_version = "2026-03"
    submission.user.approved_at = utcnow()  # approved: may log in
    db.session.commit()
    with client.session_transaction() as session:
        session["_user_id"] = submission.user.get_id()
        session["_fresh"] = True
    page = client.get(f"/submissions/{submission.id}").get_data(as_text=True)
    assert '<dd class="dataset-version">2026-03</dd>' in page
