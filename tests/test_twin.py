"""The synthetic twin per dataset version (m2d/contract/twin.py): made once by the
toolkit's generator, atomically, readable by the job account whatever the
maker's umask; the gateway records the version each submission ran on and
binds that version's twin in its dry run."""
import os
import threading
import uuid
from pathlib import Path

import pytest

from gateway import create_app
from gateway.config import ConfigError
from gateway.core import accounts, lifecycle, workflow
from gateway.core.models import Submission, utcnow
from gateway.extensions import db
from m2d.contract import sample_data, twin


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_a_twin_is_made_once_per_version_with_that_versions_parameters(tmp_path):
    made = twin.ensure(tmp_path, "2026-03")
    assert made == tmp_path / "2026-03" and sample_data.is_complete(made)
    chosen = twin.parameters("2026-03")
    sample_data.generate(tmp_path / "by-hand", cases=chosen.cases, size=chosen.size, seed=chosen.seed,
                         like=chosen.like, floor=chosen.floor)
    assert _files(made) == _files(tmp_path / "by-hand")  # the generator, with the version's parameters
    before = {p: p.stat().st_mtime_ns for p in made.rglob("*")}
    assert twin.ensure(tmp_path, "2026-03") == made  # again: left as it is
    assert {p: p.stat().st_mtime_ns for p in made.rglob("*")} == before
    other = twin.ensure(tmp_path, "2")
    assert _files(other) != _files(made)  # another version, another twin
    assert sample_data.counts(other) == sample_data.counts(made)  # the same shape: the published sample's


def test_twins_asked_for_at_once_are_made_once_and_leave_no_half_made_folder(tmp_path):
    results = []
    threads = [threading.Thread(target=lambda: results.append(twin.ensure(tmp_path, "1"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [tmp_path / "1"] * 4 and twin.is_cached(tmp_path, "1")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".1.lock", "1"]  # no temporary folder left


def test_a_twin_is_readable_by_everyone_whatever_the_makers_umask(tmp_path):
    old = os.umask(0o077)
    try:
        made = twin.ensure(tmp_path, "1")
    finally:
        os.umask(old)
    modes = {p.stat().st_mode & 0o777 for p in [made, *made.rglob("*")]}
    assert modes == {0o755, 0o644}


PUBLISHED = Path(__file__).parent / "data" / "clam-published"  # the published sample's two CSV files


def test_the_published_samples_counts_are_those_the_toolkit_carries():
    assert sample_data.counts(PUBLISHED) == sample_data.PUBLISHED
    assert sample_data.PUBLISHED.total == 10


def test_the_twin_of_a_dataset_has_its_shape_scaled_down_with_at_least_four_cases_per_split_and_label(tmp_path):
    """A skewed "real" dataset (8% malignant, few test cases): the twin keeps
    every split x label, in proportion above the floor, and each view's share."""
    skewed = sample_data.Counts(
        cases={("test", "benign"): 20, ("test", "malignant"): 2, ("train", "benign"): 90, ("train", "malignant"): 8},
        views={cell: {"LCC": n, "LMLO": n, "RCC": n, "RMLO": n - 1, "LXCCL": n // 2}
               for cell, n in {("test", "benign"): 20, ("test", "malignant"): 2,
                               ("train", "benign"): 90, ("train", "malignant"): 8}.items()})
    sample_data.generate(tmp_path / "real", cases=120, size=(16, 16), like=skewed)
    real = sample_data.counts(tmp_path / "real")
    assert real == sample_data.layout(120, skewed)  # the generator writes the counts layout() gives
    made = twin.ensure(tmp_path / "twins", "7", dataset=tmp_path / "real")
    shaped = sample_data.counts(made)
    assert set(shaped.cases) == set(real.cases)
    assert min(shaped.cases.values()) >= twin.FLOOR
    assert shaped.cases[("train", "benign")] == round(twin.CASES * 90 / 120)  # above the floor: in proportion
    assert shaped.total < 40  # small: a dry run is short
    for cell, k in shaped.cases.items():
        views, n = real.views[cell], real.cases[cell]
        assert shaped.views[cell]["LCC"] == k
        assert shaped.views[cell].get("LXCCL", 0) == min(k, int(views["LXCCL"] * k / n + 0.5))
    assert twin.ensure(tmp_path / "twins", "7", dataset=tmp_path / "real") == made  # deterministic: kept
    again = twin.ensure(tmp_path / "elsewhere", "7", dataset=tmp_path / "real")
    assert _files(again) == _files(made)  # the same version and counts: the same bytes


def test_the_testbed_datasets_twin_mirrors_its_metadata(testbed, tmp_path):
    """The gateway's twin of the testbed's "real" dataset (deploy/testbed/make_dataset.py):
    every split has every label, at least FLOOR cases each, the views in the real shares."""
    dataset = Path(testbed["env"]["M2D_DATASET_DIR"])
    real = sample_data.counts(dataset)
    made = twin.ensure(tmp_path, twin.DEFAULT_VERSION, dataset=dataset)
    shaped = sample_data.counts(made)
    splits, labels = {s for s, _ in real.cases}, {lb for _, lb in real.cases}
    assert set(shaped.cases) == {(s, lb) for s in splits for lb in labels}
    for cell, k in shaped.cases.items():
        assert k >= twin.FLOOR
        n = real.cases[cell]
        assert set(shaped.views[cell]) <= set(real.views[cell])
        for view, m in real.views[cell].items():
            assert shaped.views[cell].get(view, 0) == min(k, int(m * k / n + 0.5)) or view == max(
                real.views[cell], key=real.views[cell].get)
    # the test split scores: ROC AUC is defined on its image rows
    test_labels = [row["CaseLabel"] for row in sample_data.read_csv(made / sample_data.IMAGE_CSV)
                   if row["Split"] == "test"]
    assert test_labels.count("benign") >= twin.FLOOR and test_labels.count("malignant") >= twin.FLOOR


def test_a_twin_of_another_shape_is_made_again_and_the_old_one_set_aside(tmp_path):
    """A twin made by an older generator (or from other counts) is replaced, not used."""
    sample_data.generate(tmp_path / "1", cases=4, size=(16, 16), seed=3)  # the old generator's 4 cases
    made = twin.ensure(tmp_path, "1")
    assert twin.is_cached(tmp_path, "1") and sample_data.counts(made).total == 16
    assert [p.name.startswith(".1.replaced-") for p in tmp_path.iterdir() if p.name not in ("1", ".1.lock")] == [True]


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
    assert workflow._dataset_version(submission) == "2026-03"
    assert workflow._twin("2026-03") == tmp_path / "twins" / "2026-03"
    assert sample_data.is_complete(tmp_path / "twins" / "2026-03")  # made on first use
    local_app.config["DATASET_VERSION"] = "2026-04"  # the admins moved on between its dry run and real run
    db.session.expire_all()
    assert workflow._dataset_version(db.session.get(Submission, submission.id)) == "2026-03"
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


def test_where_the_gateway_may_not_read_the_dataset_it_uses_the_twin_the_admins_made(local_app, tmp_path, monkeypatch):
    """The dataset is the job account's only (issue 21: root:m2d-data 0750): the
    admins make the twin from its counts (make_dataset.py --twin --like), and the
    gateway, refused by the CSV files, binds that twin as it is."""
    real = tmp_path / "real"
    skewed = sample_data.Counts(cases={("test", "benign"): 9, ("test", "malignant"): 3, ("train", "benign"): 30,
                                       ("train", "malignant"): 8},
                                views={cell: {"LCC": n, "LMLO": n, "RCC": n, "RMLO": n} for cell, n in
                                       {("test", "benign"): 9, ("test", "malignant"): 3, ("train", "benign"): 30,
                                        ("train", "malignant"): 8}.items()})
    sample_data.generate(real, cases=50, size=(16, 16), like=skewed)
    made = twin.ensure(tmp_path / "twins", "5", dataset=real)  # as the admins, who may read it
    local_app.config.update(DATASET_VERSION="5", DATASET_DIR=str(real), TWIN_DIR=str(tmp_path / "twins"))
    before = _files(made)

    def refused(root):
        raise PermissionError(13, "Permission denied", str(Path(root) / sample_data.CASE_CSV))

    monkeypatch.setattr(sample_data, "counts", refused)
    assert workflow._twin("5") == made and _files(made) == before  # used as it is, not made again
