"""Disclosure reports in the airlock (issue 23, items 1 and 2): every export file's
report comes from a sealed job on the data side, reviewers decide with it.

The first part runs the rules on a local app: a report as the job writes it is
kept per manifest file (gateway.core.disclosure.parse and store), the API answers
reviewers in full and the owner with counts, a file without a report is never
approved, a `fail` file needs two written overrides. The second part walks the
proof on the real stack: a job exports files, its report job runs on Slurm with
the real checker (m2d.disclosure), the report reaches the API and the review page,
a `fail` file is refused without two overrides and released with them, and a
report made while the gateway cannot read the export at all."""
import hashlib
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from gateway import airlock, lifecycle, provenance
from gateway.core import disclosure
from gateway.extensions import db
from gateway.models import DisclosureReport
from gateway.storage import SubmissionFiles
from m2d.contract.states import Status

from .helpers.stack import SAMPLES, Stack, wait_for, zip_folder
from .helpers.users import fresh, log_in_session, make_user, token_header

RESULT, PATIENTS = b"accuracy=0.9\n", b"patient,score\nP1,0.3\n"
REASON = "holds 1 value of the identifier column Patient_Id (row 2, column 1)"


def _ended(user, files):
    submission = lifecycle.create(user, "mine.zip")
    submission.status = Status.COMPLETED.value
    db.session.commit()
    export = SubmissionFiles(submission.id).export
    export.mkdir(parents=True)
    for name, data in files.items():
        (export / name).write_bytes(data)
    airlock.manifest(submission)
    return submission


def _report(files, index_version="abc"):
    """report.json as the checker writes it (DISCLOSURE-INTERFACE)."""
    entries = []
    for path, (data, status, checks) in files.items():
        entries.append({"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "type": "text",
                        "status": status, "checks": checks})
    return json.dumps({"version": 1, "index_version": index_version, "files": entries,
                       "summary": {s: sum(e["status"] == s for e in entries) for s in ("pass", "review", "fail")}
                       }).encode()


def _keep(submission, raw):
    """What the poll does once the report job ended: the report kept."""
    assert disclosure.owe(submission)
    row = db.session.get(DisclosureReport, submission.id)
    row.status, row.slurm_job_id = "submitted", "4242"
    disclosure.store(row, disclosure.parse(raw), raw, None)
    db.session.commit()


FAIL = [{"name": "identifiers", "status": "fail", "reason": REASON}]


@pytest.fixture
def on(local_app):
    local_app.config["DISCLOSURE_REPORTS"] = True
    return local_app


@pytest.fixture
def people(on):
    owner = make_user("owner@example.org")
    reviewers = [make_user(f"{name}@example.org") for name in ("rita", "rolf")]
    for reviewer in reviewers:
        reviewer.is_reviewer = True
    db.session.commit()
    return owner, reviewers


@pytest.fixture
def checked(people):
    owner, _ = people
    submission = _ended(owner, {"result.txt": RESULT, "patients.csv": PATIENTS})
    _keep(submission, _report({"result.txt": (RESULT, "pass", []), "patients.csv": (PATIENTS, "fail", FAIL)}))
    return submission


def _as(client, user):
    fresh()  # flask.g of the shared app context remembers the last user
    log_in_session(client, user)


def _items(request):
    return {item.file.path: item for item in request.items}


def test_reviewers_get_each_files_checks_and_the_owner_only_counts(client, people, checked):
    owner, (rita, _) = people
    url = f"/api/v1/submissions/{checked.id}/disclosure"
    full = client.get(url, headers=token_header(rita)).json
    assert full["status"] == "done" and full["summary"] == {"pass": 1, "review": 0, "fail": 1, "unchecked": 0}
    files = {f["path"]: f for f in full["files"]}
    assert files["patients.csv"]["status"] == "fail" and files["patients.csv"]["checks"] == FAIL
    assert files["result.txt"]["status"] == "pass"
    counts = client.get(url, headers=token_header(owner))
    assert counts.json == {"submission_id": checked.id, "enabled": True, "status": "done",
                           "summary": {"pass": 1, "review": 0, "fail": 1, "unchecked": 0}}
    assert not any(word in counts.get_data(as_text=True) for word in ("patients", "result.txt", "Patient_Id"))
    stranger = make_user("stranger@example.org")
    assert client.get(url, headers=token_header(stranger)).status_code == 404


def test_a_fail_file_is_released_only_after_two_written_overrides(client, people, checked):
    owner, (rita, rolf) = people
    request = airlock.request_release(owner, checked, None, "the model's accuracy and the scores")
    items = _items(request)
    for reviewer in (rita, rolf):
        airlock.decide(request, reviewer, "approve", paths=["result.txt"])
    assert items["result.txt"].status == "released"
    with pytest.raises(airlock.AirlockError) as plain:
        airlock.decide(request, rita, "approve", paths=["patients.csv"])
    assert plain.value.code == "disclosure_fail"
    with pytest.raises(airlock.AirlockError) as unexplained:
        airlock.decide(request, rita, disclosure.OVERRIDE, "", paths=["patients.csv"])
    assert unexplained.value.code == "override_reason_required"
    airlock.decide(request, rita, disclosure.OVERRIDE, "the ids are the hospital's public sample ids",
                   paths=["patients.csv"])
    assert items["patients.csv"].status == "pending"  # one override is not enough
    airlock.decide(request, rolf, disclosure.OVERRIDE, "agreed: P1 is a synthetic case", paths=["patients.csv"])
    assert items["patients.csv"].status == "released"
    links = [provenance.to_dict(r) for r in provenance.chain(checked.id)]
    overrides = [link["payload"] for link in links if link["kind"] == "disclosure_override"]
    assert [(o["reviewer"], o["path"], o["comment"]) for o in overrides] == [
        ("rita@example.org", "patients.csv", "the ids are the hospital's public sample ids"),
        ("rolf@example.org", "patients.csv", "agreed: P1 is a synthetic case")]
    released = {link["payload"]["path"]: link["payload"] for link in links if link["kind"] == "released"}
    assert released["patients.csv"]["disclosure"] == "fail" and released["result.txt"]["disclosure"] == "pass"
    report_link = next(link["payload"] for link in links if link["kind"] == "disclosure_report")
    assert report_link["summary"] == {"pass": 1, "review": 0, "fail": 1} and report_link["slurm_job_id"] == "4242"
    assert provenance.verify(checked.id) is None


def test_an_override_is_only_for_a_fail_file(people, checked):
    owner, (rita, _) = people
    request = airlock.request_release(owner, checked, None, "all")
    with pytest.raises(airlock.AirlockError) as wrong:
        airlock.decide(request, rita, disclosure.OVERRIDE, "why not", paths=["result.txt"])
    assert wrong.value.code == "not_failed"


def test_a_file_without_a_report_is_never_approved_but_may_be_rejected(people):
    owner, (rita, rolf) = people
    submission = _ended(owner, {"result.txt": RESULT})
    assert disclosure.owe(submission)
    db.session.commit()
    request = airlock.request_release(owner, submission, None, "the accuracy")
    for reviewer in (rita, rolf):
        with pytest.raises(airlock.AirlockError) as pending:
            airlock.decide(request, reviewer, "approve")
        assert pending.value.code == "disclosure_pending"
    airlock.decide(request, rita, "reject", "wait for the report")
    assert _items(request)["result.txt"].status == "rejected"


def test_a_report_that_names_other_bytes_fails_the_file(people):
    owner, _ = people
    submission = _ended(owner, {"result.txt": RESULT})
    _keep(submission, _report({"result.txt": (b"other bytes", "pass", [])}))
    (verdict,) = db.session.get(DisclosureReport, submission.id).files
    assert verdict.status == "fail" and verdict.check_list == [disclosure.NOT_IN_REPORT]


@pytest.mark.parametrize("raw", [b"not json", b"[]", b'{"version": 2, "files": []}',
                                 b'{"version": 1, "files": [{"path": "a", "sha256": "x", "status": "ok"}]}',
                                 b'{"version": 1, "files": [{"path": "a", "sha256": "x", "status": "pass",'
                                 b' "checks": [{"name": "n", "status": "maybe"}]}]}'])
def test_a_report_not_in_the_interfaces_shape_is_refused(raw):
    with pytest.raises(disclosure.BadReport):
        disclosure.parse(raw)


def test_a_reason_is_kept_bounded_and_without_nul():
    raw = _report({"a": (b"a", "review", [{"name": "table", "status": "review", "reason": "x\x00" * 5000}])})
    (entry,) = disclosure.parse(raw)["files"]
    reason = entry["checks"][0]["reason"]
    assert len(reason) == disclosure.MAX_REASON and "\x00" not in reason


def test_the_owner_asks_again_for_a_rejected_file_and_reviewers_see_the_earlier_decision(client, people, checked):
    owner, (rita, rolf) = people
    first = airlock.request_release(owner, checked, None, "all of it")
    airlock.decide(first, rita, "reject", "patient ids may not leave", paths=["patients.csv"])
    with pytest.raises(airlock.AirlockError) as taken:
        airlock.request_release(owner, checked, None, "again, without saying so")
    assert taken.value.code == "nothing_to_release"
    _as(client, owner)
    page = client.get(f"/submissions/{checked.id}").get_data(as_text=True)
    assert "Ask again for the rejected files" in page and "1 fail" in page and "patients.csv" not in page
    answer = client.post(f"/api/v1/submissions/{checked.id}/release-requests", headers=token_header(owner),
                         json={"justification": "the ids are the public sample's: see the paper", "again": True})
    assert answer.status_code == 201, answer.json
    second = airlock.get_request(answer.json["id"])
    assert [item.file.path for item in second.items] == ["patients.csv"]
    _as(client, rolf)
    page = client.get(f"/review/requests/{second.id}").get_data(as_text=True)
    assert "the ids are the public sample" in page and "patient ids may not leave" in page
    assert "identifiers" in page and REASON in page and "Override the report" in page


def test_the_review_page_shows_each_files_status_and_reasons(client, people, checked):
    owner, (rita, _) = people
    request = airlock.request_release(owner, checked, None, "all")
    _as(client, rita)
    page = client.get(f"/review/requests/{request.id}").get_data(as_text=True)
    assert 'class="disclosure-status">fail' in page and 'class="disclosure-status">pass' in page
    assert REASON in page and "in ACRO" in page
    report = client.get(f"/review/submissions/{checked.id}/disclosure.json")
    assert report.status_code == 200 and json.loads(report.data)["version"] == 1
    _as(client, owner)
    assert client.get(f"/review/submissions/{checked.id}/disclosure.json").status_code == 403
