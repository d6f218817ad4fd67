"""What leaves and what each researcher was given (gateway/core/releases.py): a
model leaves as the sanitised copy the report job made, every release is kept
per researcher, and one that differs from an earlier release by a few cases'
worth of data is flagged for review.

On a local app (SQLite; PostgreSQL too, by conftest's marker): the test plays
the report job's part on the data side as m2d/disclosure/sanitise.py does it
(disclosure/report.json and its sanitised copies), and the gateway reads them
through gateway.core.jobfiles as it reads everything a job wrote."""
import hashlib
import io
import json
import zipfile

import numpy as np
import pytest

from gateway.core import airlock, lifecycle, provenance, releases
from gateway.core.models import ReleasedFile
from gateway.core.storage import SubmissionFiles
from gateway.extensions import db
from m2d.contract.states import Status
from m2d.disclosure import archives, sanitise

from .helpers import checkpoints
from .helpers.users import make_user

pytestmark = pytest.mark.databases("sqlite", "postgresql")


@pytest.fixture
def alice(local_app):
    return make_user("alice@example.org")


@pytest.fixture
def reviewers(local_app):
    found = [make_user(f"{name}@example.org") for name in ("rita", "rolf")]
    for user in found:
        user.is_reviewer = True
    db.session.commit()
    return found


def model(seed=0, noise=0.0, base_seed=None):
    rng = np.random.default_rng(seed if base_seed is None else base_seed)
    weights = {"conv.weight": rng.standard_normal((64, 32, 3, 3)).astype(np.float32),
               "fc.bias": rng.standard_normal(10).astype(np.float32)}
    if noise:
        jitter = np.random.default_rng(seed + 1000)
        weights = {k: (v + noise * jitter.standard_normal(v.shape)).astype(np.float32) for k, v in weights.items()}
    return weights


def ended_with_report(tmp_path, user, files: dict[str, bytes], sanitised=True, held_out=None):
    """An ended submission whose export holds ``files``, and the report job's
    output beside it: each model file's sanitise check and sanitised copy
    (``sanitised`` False: a report that did not type it; "unreported": typed a
    model but neither copied nor checked; "review": the check says it could not be;
    ``held_out``: the copy's held-out metric beside the original's, as predict gave them)."""
    submission = lifecycle.create(user, "mine.zip")
    submission.status = Status.COMPLETED.value
    db.session.commit()
    root = SubmissionFiles(submission.id).root
    (root / "export").mkdir(parents=True)
    report_dir = root / "disclosure"
    report_dir.mkdir()
    entries = []
    for name, data in files.items():
        (root / "export" / name).write_bytes(data)
        sha256 = hashlib.sha256(data).hexdigest()
        entry = {"path": name, "size": len(data), "sha256": sha256, "type": "binary", "status": "pass", "checks": []}
        if name.endswith(".pt") and sanitised == "unreported":
            entry.update(type="pytorch-zip")
        elif name.endswith(".pt") and sanitised == "review":
            entry.update(type="pytorch-zip", status="review", checks=[UNSANITISABLE])
        elif name.endswith(".pt") and sanitised:
            check, copy = sanitise.check_model(root / "export" / name, sha256, report_dir)
            entry.update(type="pytorch-zip", status=check["status"], checks=[check], sanitised=copy)
            if held_out is not None:
                copy["held_out"] = held_out
        elif name.endswith(".zip") and sanitised == "unreported":
            entry.update(type="zip", model_members=1)
        elif name.endswith(".zip") and sanitised:
            check, copy = archives.check_archive(root / "export" / name, sha256, report_dir, 7)
            entry.update(type="zip", status=check["status"], checks=[check], sanitised=copy, model_members=1)
        elif name.endswith(".csv"):
            entry["type"] = "csv"
        entries.append(entry)
    (report_dir / "report.json").write_text(json.dumps({"version": 1, "files": entries}))
    return submission


UNSANITISABLE = {"name": "sanitise", "status": "review", "reason": "cannot be re-saved as plain tensors, so it "
                 "would leave as it is: the pickle names posix.system, which is not a tensor"}


def release_all(user, submission, reviewers):
    request = airlock.request_release(user, submission, None, "for the paper")
    for reviewer in reviewers:
        airlock.decide(request, reviewer, "approve")
    return request


def zip_bytes(tmp_path, weights, name="m.pt"):
    return checkpoints.torch_zip(weights, tmp_path / name).read_bytes()


def test_a_released_model_is_its_sanitised_copy_which_the_owner_can_verify(tmp_path, client, alice, reviewers):
    weights = model()
    data = zip_bytes(tmp_path, weights)
    submission = ended_with_report(tmp_path, alice, {"model.pt": data})
    request = release_all(alice, submission, reviewers)
    item = request.items[0]
    assert item.status == "released"
    copy = (airlock.released_dir(submission.id) / str(item.id)).read_bytes()
    assert copy != data
    released = sanitise.read_safetensors(copy)["conv.weight"].array
    assert not (released.view(np.uint32) & 0xFFFF).any()  # the low 16 bits are gone
    assert np.allclose(released, weights["conv.weight"], rtol=2**-8)
    # the listing gives what the owner downloads, so m2d download's check holds
    listed = airlock.overview(submission)["files"][0]
    assert listed["sha256"] == hashlib.sha256(copy).hexdigest() and listed["size"] == len(copy)
    assert listed["sanitised"] is True
    row = ReleasedFile.query.one()
    assert (row.user_id, row.sha256, row.released_sha256, row.kind) == (
        alice.id, hashlib.sha256(data).hexdigest(), listed["sha256"], "pytorch-zip")
    assert json.loads(row.report)["checks"][0]["name"] == "sanitise"
    released_link = provenance.latest(submission.id, "released")
    assert released_link["sanitised"] is True and released_link["released_sha256"] == listed["sha256"]


def test_without_a_sanitised_copy_or_with_the_setting_off_a_model_leaves_as_written(
        tmp_path, local_app, alice, reviewers):
    data = zip_bytes(tmp_path, model())
    unsanitised = ended_with_report(tmp_path, alice, {"model.pt": data}, sanitised=False)
    item = release_all(alice, unsanitised, reviewers).items[0]
    assert (airlock.released_dir(unsanitised.id) / str(item.id)).read_bytes() == data
    local_app.config["RELEASE_SANITISED_MODELS"] = False
    other = ended_with_report(tmp_path, alice, {"model.pt": zip_bytes(tmp_path, model(seed=5))})
    item = release_all(alice, other, reviewers).items[0]
    assert (airlock.released_dir(other.id) / str(item.id)).read_bytes() == (
        SubmissionFiles(other.id).export / "model.pt").read_bytes()


def test_a_model_file_without_a_sanitised_copy_leaves_as_written_only_where_its_report_says_why(
        tmp_path, local_app, alice, reviewers):
    data = zip_bytes(tmp_path, model())
    unreported = ended_with_report(tmp_path, alice, {"model.pt": data}, sanitised="unreported")
    request = airlock.request_release(alice, unreported, None, "for the paper")
    with pytest.raises(airlock.AirlockError) as refused:
        airlock.decide(request, reviewers[0], "approve")
    assert refused.value.code == "no_sanitised_copy" and "model.pt" in refused.value.message
    airlock.decide(request, reviewers[0], "reject", "it would leave with its low bits")  # a rejection needs none
    assert request.items[0].status == "rejected" and ReleasedFile.query.count() == 0

    reviewed = ended_with_report(tmp_path, alice, {"model.pt": data}, sanitised="review")
    item = release_all(alice, reviewed, reviewers).items[0]
    assert item.status == "released"
    assert (airlock.released_dir(reviewed.id) / str(item.id)).read_bytes() == data
    released_link = provenance.latest(reviewed.id, "released")
    assert released_link["leaves"] == "as written" and released_link["sanitised"] is False


def test_an_archive_holding_a_model_leaves_as_its_sanitised_copy_or_not_at_all(tmp_path, local_app, alice,
                                                                               reviewers):
    weights = model()
    bundle = tmp_path / "models.zip"
    with zipfile.ZipFile(bundle, "w") as archive:
        archive.writestr("model.pt", zip_bytes(tmp_path, weights))
        archive.writestr("README.txt", "trained for two epochs")
    data = bundle.read_bytes()
    submission = ended_with_report(tmp_path, alice, {"models.zip": data})
    item = release_all(alice, submission, reviewers).items[0]
    copy = (airlock.released_dir(submission.id) / str(item.id)).read_bytes()
    with zipfile.ZipFile(io.BytesIO(copy)) as archive:
        assert archive.namelist() == ["model.pt", "README.txt"]
        released = sanitise.read_safetensors(archive.read("model.pt"))["conv.weight"].array
        assert archive.read("README.txt") == b"trained for two epochs"
    assert not (released.view(np.uint32) & 0xFFFF).any() and np.allclose(released, weights["conv.weight"], rtol=2**-8)
    assert airlock.overview(submission)["files"][0]["sha256"] == hashlib.sha256(copy).hexdigest()
    assert provenance.latest(submission.id, "released")["sanitised"] is True

    unreported = ended_with_report(tmp_path, alice, {"models.zip": data}, sanitised="unreported")
    request = airlock.request_release(alice, unreported, None, "for the paper")
    with pytest.raises(airlock.AirlockError) as refused:
        airlock.decide(request, reviewers[0], "approve")
    assert refused.value.code == "no_sanitised_copy" and "zip holding a model file" in refused.value.message


def test_past_the_reviewers_check_a_model_without_a_copy_still_never_leaves_as_written(
        tmp_path, local_app, alice, reviewers, monkeypatch):
    """The copy-out checks again (the report may have been run again between two
    approvals): with decide's check out of the way, nothing leaves either."""
    data = zip_bytes(tmp_path, model())
    unreported = ended_with_report(tmp_path, alice, {"model.pt": data}, sanitised="unreported")
    monkeypatch.setattr(releases, "refusal", lambda items: None)
    item = release_all(alice, unreported, reviewers).items[0]
    assert item.status == "changed" and ReleasedFile.query.count() == 0
    assert not (airlock.released_dir(unreported.id) / str(item.id)).exists()
    assert "without a sanitised copy" in provenance.latest(unreported.id, "release_refused")["why"]


def test_the_review_page_says_which_bytes_leave_for_each_file(tmp_path, client, local_app, alice, reviewers):
    from .helpers.users import fresh, log_in_session

    table = b"site,benign,malignant\nA,120,31\n"
    copied = ended_with_report(tmp_path, alice, {"model.pt": zip_bytes(tmp_path, model()), "counts.csv": table})
    unreported = ended_with_report(tmp_path, alice, {"model.pt": zip_bytes(tmp_path, model(seed=3))},
                                   sanitised="unreported")
    reviewed = ended_with_report(tmp_path, alice, {"model.pt": zip_bytes(tmp_path, model(seed=4))},
                                 sanitised="review")
    pages, urls = {}, {}
    for name, submission in (("copied", copied), ("unreported", unreported), ("reviewed", reviewed)):
        urls[name] = f"/review/requests/{airlock.request_release(alice, submission, None, 'for the paper').id}"
        fresh()
        log_in_session(client, reviewers[0])
        pages[name] = client.get(urls[name]).get_data(as_text=True)
    items = {part.split("</code>", 1)[0].rsplit(">", 1)[-1]: part
             for part in pages["copied"].split('<article class="release-item">')[1:]}
    model_part, table_part = items["model.pt"], items["counts.csv"]
    assert 'Leaves as: <strong class="leaves-as">sanitised copy</strong>' in model_part
    assert "floats rounded to 7 mantissa bits" in model_part
    assert 'Leaves as: <strong class="leaves-as">as written</strong>' in table_part
    assert "Cannot leave: a pytorch-zip model file without a sanitised copy" in pages["unreported"]
    assert 'Leaves as: <strong class="leaves-as">as written</strong>' in pages["reviewed"]
    assert "could not re-save as plain tensors" in pages["reviewed"] and "posix.system" in pages["reviewed"]
    local_app.config["RELEASE_SANITISED_MODELS"] = False
    page = client.get(urls["copied"]).get_data(as_text=True)
    assert "sanitised copy</strong>" not in page and "RELEASE_SANITISED_MODELS is off" in page


def test_the_review_page_shows_the_released_models_held_out_metric_beside_the_originals(
        tmp_path, client, alice, reviewers):
    from .helpers.users import fresh, log_in_session

    held_out = {"original": {"auc": 0.8125, "accuracy": 0.75, "images": 40},
                "rounded": {"auc": 0.8, "accuracy": 0.725, "images": 40},
                "auc_drop": 0.0125, "accuracy_drop": 0.025, "max_auc_drop": 0.05}
    measured = ended_with_report(tmp_path, alice, {"model.pt": zip_bytes(tmp_path, model())}, held_out=held_out)
    unmeasured = ended_with_report(tmp_path, alice, {"model.pt": zip_bytes(tmp_path, model(seed=2))},
                                   held_out={"original": {"auc": None}, "rounded": {"auc": "0.9"}})
    pages = {}
    for name, submission in (("measured", measured), ("unmeasured", unmeasured)):
        url = f"/review/requests/{airlock.request_release(alice, submission, None, 'for the paper').id}"
        fresh()
        log_in_session(client, reviewers[0])
        pages[name] = client.get(url).get_data(as_text=True)
    leaves = pages["measured"][pages["measured"].index('<p class="leaves'):]
    leaves = leaves[:leaves.index("</p>")]
    assert "held-out AUC 0.812 as written, 0.800 as released, held-out accuracy 0.750 as written, " \
           "0.725 as released" in leaves
    assert "held-out" not in pages["unmeasured"]  # only numbers are shown


def test_a_sanitised_copy_changed_after_the_report_is_never_released(tmp_path, local_app, alice, reviewers):
    submission = ended_with_report(tmp_path, alice, {"model.pt": zip_bytes(tmp_path, model())})
    copy = next((SubmissionFiles(submission.id).root / "disclosure" / "sanitised").iterdir())
    copy.write_bytes(copy.read_bytes()[:-4] + b"\x00\x00\x80\x3f")  # a weight put back after the report
    item = release_all(alice, submission, reviewers).items[0]
    assert item.status == "changed"
    assert "differs from the report's" in provenance.latest(submission.id, "release_refused")["why"]
    assert ReleasedFile.query.count() == 0


def test_a_model_a_few_cases_away_from_one_released_before_is_flagged_and_others_are_not(
        tmp_path, local_app, alice, reviewers):
    first = ended_with_report(tmp_path, alice, {"model.pt": zip_bytes(tmp_path, model(seed=1))})
    release_all(alice, first, reviewers)
    # trained again without one patient: the weights move a little
    close = ended_with_report(tmp_path, alice, {"model.pt": zip_bytes(tmp_path, model(seed=1, noise=0.002))})
    airlock.request_release(alice, close, None, "the model without case 7")
    reason = provenance.latest(close.id, "release_differencing")["files"]["model.pt"]
    assert "its weights differ from those of 'model.pt' of submission" in reason and "RELEASE_DIFF_MODEL" in reason
    # another training run (its own initialisation), the same bytes again, or another researcher: no flag
    other = ended_with_report(tmp_path, alice, {"model.pt": zip_bytes(tmp_path, model(seed=2))})
    same = ended_with_report(tmp_path, alice, {"model.pt": zip_bytes(tmp_path, model(seed=1))})  # another zip
    bob = make_user("bob@example.org")
    bobs = ended_with_report(tmp_path, bob, {"model.pt": zip_bytes(tmp_path, model(seed=1, noise=0.002))})
    for submission in (other, same, bobs):
        assert releases.flag_request(submission, airlock.manifest(submission).files) == {}


def test_a_count_table_with_a_few_counts_changed_is_flagged_and_another_table_is_not(
        tmp_path, local_app, alice, reviewers):
    table = b"site,benign,malignant\nA,120,31\nB,98,27\n"
    first = ended_with_report(tmp_path, alice, {"counts.csv": table})
    release_all(alice, first, reviewers)
    nudged = ended_with_report(tmp_path, alice, {"counts.csv": table.replace(b"31", b"30")})
    flagged = releases.flag_request(nudged, airlock.manifest(nudged).files)
    assert "1 cells changed by at most 1" in flagged["counts.csv"][0]["reason"]
    assert flagged["counts.csv"][0]["status"] == "review"
    relabelled = ended_with_report(tmp_path, alice, {"counts.csv": table.replace(b"B,", b"C,")})
    far = ended_with_report(tmp_path, alice, {"counts.csv": table.replace(b"98", b"198")})
    for submission in (relabelled, far):
        assert releases.flag_request(submission, airlock.manifest(submission).files) == {}


def test_a_file_of_another_type_is_compared_by_its_type_and_size(tmp_path, local_app, alice, reviewers):
    first = ended_with_report(tmp_path, alice, {"weights.bin": bytes(1000)})
    release_all(alice, first, reviewers)
    again = ended_with_report(tmp_path, alice, {"weights.bin": bytes(999) + b"\x01"})
    assert "type (binary) and size" in releases.flag_request(again, airlock.manifest(again).files)[
        "weights.bin"][0]["reason"]
    bigger = ended_with_report(tmp_path, alice, {"weights.bin": bytes(2000)})
    assert releases.flag_request(bigger, airlock.manifest(bigger).files) == {}


def test_model_distance_needs_the_same_architecture():
    a = {"w": {"shape": [2], "norm": 1.0, "projection": [1.0, 0.0]}}
    assert releases.model_distance(a, a) == 0
    assert releases.model_distance(a, {"w": {"shape": [3], "norm": 1.0, "projection": [1.0, 0.0]}}) is None
    assert releases.model_distance(a, {"v": a["w"]}) is None
