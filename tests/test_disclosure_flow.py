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
import base64
import hashlib
import json
import os
import pwd
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from gateway.core import airlock, disclosure, lifecycle, provenance
from gateway.core.models import DisclosureReport
from gateway.core.storage import SubmissionFiles
from gateway.extensions import db
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


def test_two_overrides_are_needed_even_where_one_approval_releases(on, people, checked):
    on.config["RELEASE_APPROVALS"] = 1
    owner, (rita, rolf) = people
    request = airlock.request_release(owner, checked, None, "all")
    airlock.decide(request, rita, disclosure.OVERRIDE, "the ids are public", paths=["patients.csv"])
    assert _items(request)["patients.csv"].status == "pending"
    airlock.decide(request, rolf, disclosure.OVERRIDE, "agreed", paths=["patients.csv"])
    assert _items(request)["patients.csv"].status == "released"


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


def test_a_report_job_the_site_cannot_make_fails_the_report_with_the_setting_named(on, people):
    from gateway.core import disclosure_job

    on.config["IMAGE_DIR"] = None  # a site without an image folder (the testbed's env names one)
    owner, _ = people
    submission = _ended(owner, {"result.txt": RESULT})
    assert disclosure.owe(submission)
    db.session.commit()
    assert disclosure_job.submit(submission.id) is None
    row = db.session.get(DisclosureReport, submission.id)
    assert row.status == "failed" and "M2D_IMAGE_DIR" in row.error


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
    db.session.get(DisclosureReport, checked.id).acro = '{"version": "1.0.2", "results": {}}'
    db.session.commit()
    acro = client.get(f"/review/submissions/{checked.id}/acro.json")  # the page's "in ACRO's shape" link
    assert acro.status_code == 200 and json.loads(acro.data)["version"] == "1.0.2"
    assert acro.headers["Content-Disposition"] == "attachment; filename=results.json"  # the name ACRO's loader opens
    _as(client, owner)
    assert client.get(f"/review/submissions/{checked.id}/disclosure.json").status_code == 403
    assert client.get(f"/review/submissions/{checked.id}/acro.json").status_code == 403


def test_the_report_job_sanitises_models_as_the_release_settings_say(on, people, tmp_path):
    """RELEASE_SANITISED_MODELS on: the job's checker writes the sanitised copies
    (--sanitise-bits RELEASE_MANTISSA_BITS); off: none, and nothing else sanitises."""
    import io
    import zipfile

    from gateway.core import disclosure_job

    owner, _ = people
    submission = _ended(owner, {"model.pt": b"weights"})
    on.config.update(DISCLOSURE_INDEX_DIR=str(tmp_path / "index"), DATASET_DIR=str(tmp_path / "dataset"),
                     RELEASE_MANTISSA_BITS=5)
    empty_wheel = io.BytesIO()
    zipfile.ZipFile(empty_wheel, "w").close()
    files = SubmissionFiles(submission.id)
    files.job.mkdir(parents=True, exist_ok=True)
    for setting, wanted in ((True, "--sanitise-bits 5 \\\n"), (False, None)):
        on.config["RELEASE_SANITISED_MODELS"] = setting
        script = disclosure_job._write_job(submission, files, Path("/i.sif"), empty_wheel.getvalue()).read_text()
        report_line = script[script.index("m2d.disclosure report"):script.index("|| status=$?")]
        assert ("--sanitise-bits" in report_line) is setting, report_line
        if wanted:
            assert wanted in report_line


def test_the_report_job_runs_predict_in_the_submissions_image_only_when_declared(on, people, tmp_path):
    """m2d.toml declares predict: the job plans in the checker's image, runs predict
    in the submission's image (code, dataset, export read-only; scratch alone
    writable; no network; timeout) and hands both to the report step. Without
    one: no membership step and no check; an image that cannot be had: a review."""
    import io
    import zipfile

    from gateway.core import disclosure_job

    owner, _ = people
    submission = _ended(owner, {"model.pt": b"weights"})
    on.config.update(DISCLOSURE_INDEX_DIR=str(tmp_path / "index"), DATASET_DIR=str(tmp_path / "dataset"),
                     DISCLOSURE_MIA_SECONDS=77, DISCLOSURE_MIA_MAX_IMAGES=9, DISCLOSURE_MIA_FAIL_AUC=0.85,
                     DISCLOSURE_MIA_MIN_CASES=3)
    empty_wheel = io.BytesIO()
    zipfile.ZipFile(empty_wheel, "w").close()
    files = SubmissionFiles(submission.id)
    files.job.mkdir(parents=True, exist_ok=True)
    files.code.mkdir(parents=True, exist_ok=True)

    def script(membership):
        return disclosure_job._write_job(submission, files, Path("/i.sif"), empty_wheel.getvalue(),
                                         membership).read_text()

    plain = script(None)
    assert "membership" not in plain and "--mia-" not in plain
    (files.code / "m2d.toml").write_text('[disclosure]\npredict = "net.model:predict"\n')
    assert disclosure_job.predict_entry(files) == "net.model:predict"
    text = script(("net.model:predict", Path("/images/env-abc.sif"), None))
    step = text[text.index("predict() {"):text.index("\n}\n", text.index("predict() {"))]
    assert "timeout --kill-after=10 77" in step
    assert "/images/env-abc.sif" in step and "--entry net.model:predict" in step
    assert "--containall --cleanenv --no-privs --net --network none" in step
    for bind in (f"{files.code}:/code:ro", f"{tmp_path / 'dataset'}:/mnt/dataset:ro",
                 '"$mia_dir/plan:/mnt/plan:ro"', '"$scratch:/mnt/scratch"'):
        assert f"--bind {bind}" in step, bind
    assert "/i.sif" not in step.replace("env-abc.sif", "")  # predict never runs in the checker's image
    assert "--out /mnt/scratch/membership.json >/dev/null 2>&1\n" in step  # prints into no log
    assert f'predict "$mia_dir/scratch" {files.export}:/mnt/export:ro || mia_exit=$?' in text
    # again on the export as it would be released: the rounded view as /mnt/export, the export read-only
    # beside it, a scratch folder of its own
    assert ("rounded-view --export /mnt/export --view /mnt/rounded/view --link-to /mnt/original "
            f"\\\n      --sanitise-bits {on.config['RELEASE_MANTISSA_BITS']} ") in text
    assert (f'predict "$mia_dir/scratch-rounded" "$mia_dir/rounded/view:/mnt/export:ro" '
            f'{files.export}:/mnt/original:ro') in text
    assert "membership-plan --dataset /mnt/dataset --max-images 9" in text
    report_line = text[text.index("m2d.disclosure report"):text.index("|| status=$?")]
    assert "--membership-plan /mnt/membership/plan/plan.json" in report_line
    assert "--mia-fail-auc 0.85 --mia-review-auc 0.6" in report_line and "--mia-min-cases 3" in report_line
    assert "--rounded-view /mnt/membership/rounded/view.json" in report_line
    assert '--rounded-exit "$rounded_exit"' in report_line and "--sanitised-max-auc-drop 0.05" in report_line
    minutes = -(-(on.config["DISCLOSURE_SECONDS"] + 2 * 77 + disclosure_job.GRACE_SECONDS) // 60)
    assert f"#SBATCH --time={minutes}\n" in text  # the checker's, predict's twice and the grace, in minutes
    syntax = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    on.config.update(RELEASE_SANITISED_MODELS=False)  # no copies: predict once
    unsanitised = script(("net.model:predict", Path("/images/env-abc.sif"), None))
    assert "rounded-view" not in unsanitised and "--rounded-" not in unsanitised
    minutes = -(-(on.config["DISCLOSURE_SECONDS"] + 77 + disclosure_job.GRACE_SECONDS) // 60)
    assert f"#SBATCH --time={minutes}\n" in unsanitised
    missing = script(("net.model:predict", None, "the submission's image could not be had (BuildError)"))
    assert "timeout --kill-after" not in missing
    assert "--membership-error 'the submission'\"'\"'s image could not be had (BuildError)'" in missing


# ---------------------------------------------------------------- the real stack

JOB_USER = os.environ.get("M2D_JOB_USER", "m2d-job")
GATEWAY_USER = os.environ.get("M2D_USER", "m2d")
# the job reads the dataset's case list and exports its ids beside a harmless result
EXPORTING_IDS = """\
import csv
from pathlib import Path

with open("/mnt/dataset/clam-details-case-extrainfo.csv", newline="") as f:
    cases = list(csv.DictReader(f, delimiter=";"))
out = Path("/mnt/export")
(out / "result.txt").write_text("accuracy=0.9\\n")
with open(out / "predictions.csv", "w") as f:
    f.write("patient,case,score\\n")
    for case in cases[:3]:
        f.write(f"{case['Patient_Id']},{case['CaseName']},0.5\\n")
print("exported", flush=True)
"""


def _as_gateway(*argv):
    return subprocess.run(["setpriv", f"--reuid={GATEWAY_USER}", f"--regid={GATEWAY_USER}", "--init-groups", "--",
                           *argv], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def index_root():
    """DISCLOSURE_INDEX_DIR as docs/admin.md says: the job account's, in the
    dataset's group (which the gateway is not in), setgid."""
    root = Path(f"/tmp/m2d-disclosure-index-{uuid.uuid4().hex[:8]}")
    root.mkdir(mode=0o750)
    group = Path(os.environ["M2D_DATASET_DIR"]).stat().st_gid
    os.chown(root, pwd.getpwnam(JOB_USER).pw_uid, group)
    root.chmod(0o2750)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _reviewer(stack, name, **settings):
    """A new researcher of ``stack`` made a reviewer, as an admin does."""
    reviewer = stack.researcher(name, **settings)
    stack.flask("users", "grant-reviewer", reviewer.address)
    return reviewer


def _finished_report(reviewer, submission_id):
    """The submission's disclosure report once it is done or failed, as a reviewer reads it."""
    return wait_for(lambda: (r := reviewer.api("GET", f"/submissions/{submission_id}/disclosure").json())
                    ["status"] in ("done", "failed") and r, 900, f"submission {submission_id}'s disclosure report")


def _run_to_its_report(owner, reviewer, zip_path, timeout=900):
    """``zip_path`` submitted by ``owner``, run to completion, and its report job done:
    (submission id, the report as ``reviewer`` reads it)."""
    submission_id = owner.submit(zip_path)
    done = owner.wait_until(submission_id, {"completed", "failed", "build_failed"}, timeout=timeout)
    assert done["status"] == "completed", (done["reason"], done["error"])
    report = _finished_report(reviewer, submission_id)
    assert report["status"] == "done", report
    return submission_id, report


@pytest.fixture(scope="module")
def reporting_stack(testbed, index_root):
    running = Stack(M2D_DISCLOSURE_REPORTS="1", M2D_DISCLOSURE_INDEX_DIR=str(index_root),
                    M2D_DATASET_VERSION=f"flow-{uuid.uuid4().hex[:6]}",
                    M2D_DISCLOSURE_MIA_MIN_CASES="2").start()  # the testbed's CLaM: 8 train, 2 test cases
    yield running
    running.stop()


@pytest.fixture(scope="module")
def exported(reporting_stack, tmp_path_factory):
    stack = reporting_stack
    owner = stack.researcher("exporter", dry_run=False)
    reviewers = [_reviewer(stack, name) for name in ("rev-ann", "rev-ben")]
    zip_path = zip_folder(SAMPLES / "sleeps", tmp_path_factory.mktemp("disclosure") / "ids.zip",
                          extra={"main.py": EXPORTING_IDS})
    submission_id, report = _run_to_its_report(owner, reviewers[0], zip_path)
    return stack, owner, reviewers, submission_id, report


def test_the_report_job_runs_on_slurm_and_reaches_the_api(exported, index_root):
    stack, owner, _reviewers, submission_id, report = exported
    assert report["status"] == "done", report
    files = {f["path"]: f for f in report["files"]}
    assert set(files) == {"result.txt", "predictions.csv"}
    assert files["predictions.csv"]["status"] == "fail", files
    assert any(c["name"] == "identifiers" and c["status"] == "fail" for c in files["predictions.csv"]["checks"])
    assert files["result.txt"]["status"] in ("pass", "review"), files["result.txt"]
    # the report job is Slurm's, named for the submission, and ran as the job account
    deadline = time.monotonic() + 60
    while True:  # slurmdbd names a young job's record "allocation" for a while (the adapter's find says more)
        sacct = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobName,User,State", "-j", report["slurm_job_id"]],
                               capture_output=True, text=True, timeout=30).stdout.split("\n")[0].split("|")
        if sacct[0] not in ("", "allocation") or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert sacct[0].endswith(f"-{submission_id}-disclosure") and sacct[1:] == [JOB_USER, "COMPLETED"], sacct
    # the owner: counts alone, no name, no reason
    counts = owner.api("GET", f"/submissions/{submission_id}/disclosure")
    assert counts.json()["summary"]["fail"] == 1 and "files" not in counts.json()
    assert not any(word in counts.text for word in ("predictions", "result.txt", "identifier"))
    # the fingerprint index was built once, on the data side, where the gateway cannot read
    (version,) = [p for p in index_root.iterdir() if p.is_dir()]
    assert (version / "version.json").is_file()
    refused = _as_gateway("ls", str(version))
    assert refused.returncode != 0 and "Permission denied" in refused.stderr


def test_a_fail_file_needs_two_overrides_on_the_stack(exported):
    stack, owner, (ann, ben), submission_id, _report = exported
    response = owner.api("POST", f"/submissions/{submission_id}/release-requests",
                         json={"justification": "the accuracy, and the predictions for our paper"})
    assert response.status_code == 201, response.text
    request_id = str(response.json()["id"])
    for reviewer in (ann, ben):
        stack.flask("releases", "approve", request_id, "--reviewer", reviewer.address, "--path", "result.txt")
    refused = stack.flask_result("releases", "approve", request_id, "--reviewer", ann.address,
                                 "--path", "predictions.csv")
    assert refused.returncode != 0 and "override" in refused.stderr, refused.stderr
    stack.flask("releases", "override", request_id, "--reviewer", ann.address, "--path", "predictions.csv",
                "--comment", "the case ids are the public sample's")
    held = owner.api("GET", f"/submissions/{submission_id}/export/predictions.csv")
    assert held.status_code == 404, "one override released a fail file"
    stack.flask("releases", "override", request_id, "--reviewer", ben.address, "--path", "predictions.csv",
                "--comment", "agreed, see the data use agreement")
    download = owner.api("GET", f"/submissions/{submission_id}/export/predictions.csv")
    assert download.status_code == 200, download.text
    chain = owner.api("GET", f"/submissions/{submission_id}/provenance").json()
    assert chain["verified"]
    kinds = [r["kind"] for r in chain["records"]]
    assert kinds.index("manifest") < kinds.index("disclosure_report") < kinds.index("disclosure_override")
    overrides = [r["payload"] for r in chain["records"] if r["kind"] == "disclosure_override"]
    assert [o["reviewer"] for o in overrides] == [ann.address, ben.address]
    assert {o["comment"] for o in overrides} == {"the case ids are the public sample's",
                                                 "agreed, see the data use agreement"}


def test_the_report_comes_from_the_job_not_the_gateway(exported):
    """The export made unreadable to the gateway's account: the report job, as
    the job account, still checks it, and the gateway keeps its report."""
    stack, _owner, (ann, _ben), submission_id, first = exported
    export = Path(stack.env["M2D_DATA_DIR"]) / "submissions" / str(submission_id) / "export"
    mode, owner_ids = export.stat().st_mode, (export.stat().st_uid, export.stat().st_gid)
    job = pwd.getpwnam(JOB_USER)
    os.chown(export, job.pw_uid, job.pw_gid)
    export.chmod(0o700)
    try:
        assert _as_gateway("cat", str(export / "result.txt")).returncode != 0  # the gateway cannot read it
        stack.flask("disclosure", "rerun", str(submission_id))
        again = wait_for(lambda: (r := ann.api("GET", f"/submissions/{submission_id}/disclosure").json())
                         ["status"] in ("done", "failed") and r["slurm_job_id"] != first["slurm_job_id"] and r,
                         600, "the second report")
    finally:
        os.chown(export, *owner_ids)
        export.chmod(mode & 0o7777)
    assert again["status"] == "done", again
    assert {f["path"]: f["status"] for f in again["files"]} == {f["path"]: f["status"] for f in first["files"]}


def _one_file_exported_and_reported(owner, reviewer, tmp_path, name: str, written: bytes):
    """A job that writes ``written`` to /mnt/export/NAME, run to its report:
    (submission id, the API's entry, its sanitise check, the entry in the report
    job's own report.json, with the sanitised copy it names)."""
    main = ("import base64\nfrom pathlib import Path\n"
            f"Path('/mnt/export/{name}').write_bytes(base64.b64decode({base64.b64encode(written).decode()!r}))\n"
            "print('exported', flush=True)\n")
    submission_id, report = _run_to_its_report(
        owner, reviewer, zip_folder(SAMPLES / "sleeps", tmp_path / "job.zip", extra={"main.py": main}))
    (entry,) = report["files"]
    assert entry["path"] == name and entry["status"] != "fail", entry
    check = next(c for c in entry["checks"] if c["name"] == "sanitise")
    folder = Path(owner.stack.env["M2D_DATA_DIR"]) / "submissions" / str(submission_id) / "disclosure"
    (named,) = [f for f in json.loads((folder / "report.json").read_text())["files"] if f["path"] == name]
    return submission_id, entry, check, named


def test_a_released_model_is_the_report_jobs_sanitised_copy_on_the_stack(reporting_stack, tmp_path):
    """A job writes model.pt whose low mantissa bits carry a payload; the report job
    (Slurm, Apptainer) re-saves it; two reviewers approve; the owner downloads the
    sanitised copy the report names, never the bytes the job wrote."""
    import numpy as np
    from safetensors.numpy import load as load_safetensors

    from .helpers import checkpoints

    stack = reporting_stack
    owner = stack.researcher("modeller", dry_run=False)
    reviewers = [_reviewer(stack, name) for name in ("rev-dan", "rev-eve")]
    rng = np.random.default_rng(7)
    weights = {"conv.weight": (rng.standard_normal((32, 16, 3, 3)) * 0.1).astype(np.float32),
               "fc.bias": rng.standard_normal(10).astype(np.float32)}
    payload = rng.integers(0, 256, weights["conv.weight"].size, dtype=np.uint8)
    raw = weights["conv.weight"].reshape(-1).view(np.uint32)
    weights["conv.weight"] = ((raw & np.uint32(0xFFFFFF00)) | payload).view(np.float32).reshape(32, 16, 3, 3)
    written = checkpoints.torch_zip(weights, tmp_path / "model.pt").read_bytes()
    submission_id, _entry, sanitise_check, named = _one_file_exported_and_reported(
        owner, reviewers[0], tmp_path, "model.pt", written)
    assert sanitise_check["status"] == "pass" and "7 mantissa bits" in sanitise_check["reason"], sanitise_check
    # the report job wrote the copy beside its report, as the job account
    folder = Path(stack.env["M2D_DATA_DIR"]) / "submissions" / str(submission_id) / "disclosure"
    copy = named["sanitised"]
    assert copy["name"] == f"sanitised/{hashlib.sha256(written).hexdigest()}.safetensors"
    assert pwd.getpwuid((folder / copy["name"]).stat().st_uid).pw_name == JOB_USER

    response = owner.api("POST", f"/submissions/{submission_id}/release-requests",
                         json={"justification": "the trained model for the paper"})
    assert response.status_code == 201, response.text
    request_id = str(response.json()["id"])
    held = owner.api("GET", f"/submissions/{submission_id}/export/model.pt")
    assert held.status_code == 404
    for reviewer in reviewers:
        stack.flask("releases", "approve", request_id, "--reviewer", reviewer.address, "--path", "model.pt")
    download = owner.api("GET", f"/submissions/{submission_id}/export/model.pt")
    assert download.status_code == 200, download.text
    released = download.content
    assert released != written
    assert hashlib.sha256(released).hexdigest() == copy["sha256"] and len(released) == copy["size"]
    listed = owner.api("GET", f"/submissions/{submission_id}/export").json()["files"]
    assert [(f["path"], f["sha256"], f["sanitised"]) for f in listed] == [("model.pt", copy["sha256"], True)]
    tensors = load_safetensors(released)  # plain tensors: the real safetensors package reads them
    assert {k: (v.shape, v.dtype) for k, v in tensors.items()} == {k: (v.shape, v.dtype) for k, v in weights.items()}
    low = (tensors["conv.weight"].reshape(-1).view(np.uint32) & np.uint32(0xFF)).astype(np.uint8)
    assert not low.any() and not np.array_equal(low, payload)
    chain = owner.api("GET", f"/submissions/{submission_id}/provenance").json()
    (link,) = [r["payload"] for r in chain["records"] if r["kind"] == "released"]
    assert link["leaves"] == "sanitised copy" and link["released_sha256"] == copy["sha256"]


def test_a_model_inside_a_zip_leaves_only_in_the_report_jobs_sanitised_copy_on_the_stack(reporting_stack, tmp_path):
    """A job writes models.zip holding a model.pt whose low mantissa bits carry a
    payload, and a README; the report job (Slurm, Apptainer) writes a copy of the
    zip with that member re-saved; two reviewers approve; the owner downloads the
    copy: the same members, the README as written, the payload gone."""
    import io
    import zipfile

    import numpy as np
    from safetensors.numpy import load as load_safetensors

    from .helpers import checkpoints

    stack = reporting_stack
    owner = stack.researcher("zipper", dry_run=False)
    reviewers = [_reviewer(stack, name) for name in ("rev-zed", "rev-zoe")]
    rng = np.random.default_rng(8)
    weights = {"conv.weight": (rng.standard_normal((32, 16, 3, 3)) * 0.1).astype(np.float32)}
    payload = rng.integers(0, 256, weights["conv.weight"].size, dtype=np.uint8)
    raw = weights["conv.weight"].reshape(-1).view(np.uint32)
    weights["conv.weight"] = ((raw & np.uint32(0xFFFFFF00)) | payload).view(np.float32).reshape(32, 16, 3, 3)
    bundle = io.BytesIO()
    with zipfile.ZipFile(bundle, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("weights/model.pt", checkpoints.torch_zip(weights, tmp_path / "model.pt").read_bytes())
        archive.writestr("README.txt", "two epochs")
    written = bundle.getvalue()
    submission_id, _entry, check, named = _one_file_exported_and_reported(
        owner, reviewers[0], tmp_path, "models.zip", written)
    assert check["status"] == "pass" and "member 'weights/model.pt'" in check["reason"], check
    copy = named["sanitised"]
    assert copy["name"] == f"sanitised/{hashlib.sha256(written).hexdigest()}.zip" and named["model_members"] == 1

    response = owner.api("POST", f"/submissions/{submission_id}/release-requests",
                         json={"justification": "the trained model for the paper"})
    assert response.status_code == 201, response.text
    for reviewer in reviewers:
        stack.flask("releases", "approve", str(response.json()["id"]), "--reviewer", reviewer.address,
                    "--path", "models.zip")
    download = owner.api("GET", f"/submissions/{submission_id}/export/models.zip")
    assert download.status_code == 200, download.text
    released = download.content
    assert released != written and hashlib.sha256(released).hexdigest() == copy["sha256"]
    with zipfile.ZipFile(io.BytesIO(released)) as archive:
        assert archive.namelist() == ["weights/model.pt", "README.txt"]
        assert archive.read("README.txt") == b"two epochs"
        tensors = load_safetensors(archive.read("weights/model.pt"))
    low = (tensors["conv.weight"].reshape(-1).view(np.uint32) & np.uint32(0xFF)).astype(np.uint8)
    assert not low.any() and np.allclose(tensors["conv.weight"], weights["conv.weight"], rtol=2**-8)
    chain = owner.api("GET", f"/submissions/{submission_id}/provenance").json()
    (link,) = [r["payload"] for r in chain["records"] if r["kind"] == "released"]
    assert link["leaves"] == "sanitised copy" and link["released_sha256"] == copy["sha256"]


# the job remembers each training image's label (by a hash of its path: no identifier
# leaves in the file) and its predict answers from memory: a perfect member
MEMORISING_JOB = """\
import csv, hashlib, json


def main():
    with open("/mnt/dataset/clam-details-image.csv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter=";"))
    seen = {hashlib.sha256(("/mnt/dataset/" + r["ImagePath"]).encode()).hexdigest():
            float(r["CaseLabel"] == "malignant") for r in rows if r["Split"] == "train"}
    with open("/mnt/export/memory.json", "w") as f:
        json.dump(seen, f)
    print("remembered", len(seen), flush=True)


def predict(export_dir, images):
    with open(export_dir + "/memory.json") as f:
        seen = json.load(f)
    return [seen.get(hashlib.sha256(path.encode()).hexdigest(), 0.5) for path in images]


if __name__ == "__main__":
    main()
"""


def test_a_memorising_predict_fails_its_model_on_the_stack(reporting_stack, tmp_path):
    """m2d.toml declares predict; the report job on Slurm runs it in the submission's
    image (Apptainer, sealed), and the checker's attack tells members apart: the
    exported model fails its membership check. Reviewers read the AUC and the worst
    cases; the owner gets counts."""
    stack = reporting_stack
    owner = stack.researcher("memoriser", dry_run=False)
    reviewer = _reviewer(stack, "rev-mia")
    zip_path = zip_folder(SAMPLES / "sleeps", tmp_path / "memory.zip",
                          extra={"main.py": MEMORISING_JOB, "m2d.toml": '[disclosure]\npredict = "main:predict"\n'})
    submission_id, report = _run_to_its_report(owner, reviewer, zip_path)
    (entry,) = report["files"]
    assert entry["path"] == "memory.json" and entry["status"] == "fail", entry
    (check,) = [c for c in entry["checks"] if c["name"] == "membership"]
    assert check["status"] == "fail", check
    auc = float(check["reason"].split("attack AUC ")[1].split(" ")[0])
    assert auc > 0.8, check
    assert "(8 cases, Split=train)" in check["reason"] and "(2 cases, Split=test)" in check["reason"], check
    assert "furthest below the test losses' median: S" in check["reason"], check
    assert [c["name"] for c in entry["checks"] if c["status"] == "fail"] == ["membership"], entry
    counts = owner.api("GET", f"/submissions/{submission_id}/disclosure")
    assert counts.json()["summary"]["fail"] == 1 and "files" not in counts.json()
    assert "membership" not in counts.text and "S1-A1" not in counts.text


# the issue's four exports that must fail, made by a job from the data it reads (standard
# library alone: the base image's Python)
HOSTILE_JOB = r"""
import csv, pickle, struct, zipfile, zlib
from pathlib import Path

data, out = Path("/mnt/dataset"), Path("/mnt/export")
with open(data / "clam-details-image.csv", newline="") as f:
    images = list(csv.DictReader(f, delimiter=";"))
with open(data / "clam-details-case-extrainfo.csv", newline="") as f:
    cases = list(csv.DictReader(f, delimiter=";"))

# 1. a dataset NPY as a tensor's storage in a PyTorch zip checkpoint
with zipfile.ZipFile(out / "model.pt", "w", zipfile.ZIP_STORED) as z:
    z.writestr("model/data.pkl", pickle.dumps({"fc.weight": "storage 0"}, protocol=2))
    z.writestr("model/data/0", (data / images[0]["ImagePath"]).with_suffix(".npy").read_bytes())
    z.writestr("model/version", "3\n")


# 2. a dataset PNG resized by one pixel (nearest neighbour) and encoded again
def grey_rows(png):
    pos, idat = 8, b""
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        body = png[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            assert (depth, colour) == (8, 0), (depth, colour)  # the testbed's: 8-bit grey
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    flat, rows, above = zlib.decompress(idat), [], bytearray(width)
    for y in range(height):
        kind, line = flat[y * (width + 1)], bytearray(flat[y * (width + 1) + 1:(y + 1) * (width + 1)])
        for x in range(width):
            a, b, c = (line[x - 1] if x else 0), above[x], (above[x - 1] if x else 0)
            p = a + b - c
            guess = {0: 0, 1: a, 2: b, 3: (a + b) // 2,
                     4: a if abs(p - a) <= min(abs(p - b), abs(p - c)) else b if abs(p - b) <= abs(p - c) else c}
            line[x] = (line[x] + guess[kind]) & 255
        rows.append(line)
        above = line
    return rows


def grey_png(rows):
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    head = struct.pack(">IIBBBBB", len(rows[0]), len(rows), 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"".join(b"\0" + bytes(row) for row in rows), 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


rows = grey_rows((data / images[0]["ImagePath"]).read_bytes())
width = len(rows[0])
(out / "figure.png").write_bytes(grey_png([[row[x * width // (width - 1)] for x in range(width - 1)] for row in rows]))

# 3. patient ids in a results table
with open(out / "results.csv", "w") as f:
    f.write("patient_id,auc\n" + "".join(f"{case['Patient_Id']},0.{i}\n" for i, case in enumerate(cases)))

# 4. one row per training case, numbers alone
train = [case for case in cases if case["Split"] == "train"]
with open(out / "per_case.csv", "w") as f:
    f.write("score,label\n" + "".join(f"0.{i + 1},{i % 2}\n" for i in range(len(train))))
print("exported", flush=True)
"""


def test_the_issues_hostile_exports_each_fail_on_the_stack(reporting_stack, tmp_path):
    """Issue 23's proof on the real stack: a dataset NPY in a torch checkpoint, a dataset
    PNG resized by a pixel and encoded again, patient ids in a results CSV and a table
    with one row per training case each end ``fail``, each by the check made for it."""
    stack = reporting_stack
    owner = stack.researcher("hostile", dry_run=False)
    reviewer = _reviewer(stack, "rev-hostile")
    _submission_id, report = _run_to_its_report(
        owner, reviewer, zip_folder(SAMPLES / "sleeps", tmp_path / "hostile.zip", extra={"main.py": HOSTILE_JOB}))
    files = {f["path"]: f for f in report["files"]}
    failing = {path: sorted(c["name"] for c in entry["checks"] if c["status"] == "fail")
               for path, entry in files.items()}
    assert {path: entry["status"] for path, entry in files.items()} == dict.fromkeys(
        ("model.pt", "figure.png", "results.csv", "per_case.csv"), "fail"), failing
    assert "dataset-content" in failing["model.pt"], failing
    assert failing["figure.png"] == ["near-duplicate-image"], failing  # no byte in common: the pHash
    assert "identifiers" in failing["results.csv"], failing
    assert failing["per_case.csv"] == ["table"], failing


def test_the_review_page_shows_each_files_status_and_reasons_in_chromium(exported, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    stack, owner, (ann, _ben), submission_id, _report = exported
    password = "correct horse battery staple"
    reviewer = _reviewer(stack, "rev-cat", password=password)
    request_id = owner.api("GET", f"/submissions/{submission_id}/export").json()["requests"][0]["id"]
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.implicitly_wait(5)
    try:
        driver.get(f"{stack.url}/login")
        driver.find_element(By.NAME, "email").send_keys(reviewer.address)
        driver.find_element(By.NAME, "password").send_keys(password)
        driver.find_element(By.CSS_SELECTOR, "main button[type=submit]").click()
        wait_for(lambda: "/login" not in driver.current_url, 30, "the login")
        driver.get(f"{stack.url}/review/requests/{request_id}")
        items = {item.find_element(By.CSS_SELECTOR, "h3 code").text: item
                 for item in driver.find_elements(By.CSS_SELECTOR, "article.release-item")}
        assert items["predictions.csv"].find_element(By.CSS_SELECTOR, ".disclosure-status").text == "fail"
        checks = items["predictions.csv"].find_element(By.CSS_SELECTOR, ".disclosure-checks").text
        assert "identifiers: fail:" in checks and len(checks) > len("identifiers: fail: ")
        assert items["result.txt"].find_element(By.CSS_SELECTOR, ".disclosure-status").text in ("pass", "review")
        assert "Disclosure report: done" in driver.find_element(By.CSS_SELECTOR, ".disclosure-summary").text
        driver.save_screenshot(str(tmp_path / "disclosure-review.png"))
    finally:
        driver.quit()


def test_the_clam_samples_trained_model_is_not_failed_and_gets_its_membership_test_and_copy(
        reporting_stack, tmp_path):
    """The hospital's own sample, two epochs on the data: a `fail` on its model.tar
    or metrics.json would be a false positive every honest researcher meets. The
    model gets the membership test through the sample's m2d.toml predict (run in
    the sample's own image) and a sanitised copy, and the same predict, run again
    on the export with model.tar rounded as its copy is, gives the released
    model's held-out metric beside the original's."""
    stack = reporting_stack
    owner = stack.researcher("clam-owner", dry_run=False)
    reviewer = _reviewer(stack, "clam-reviewer")
    submission_id, report = _run_to_its_report(owner, reviewer, zip_folder(SAMPLES / "clam", tmp_path / "clam.zip"),
                                               timeout=1800)
    files = {f["path"]: f for f in report["files"]}
    assert set(files) == {"model.tar", "metrics.json"}, files
    assert all(f["status"] in ("pass", "review") for f in files.values()), files
    checks = {c["name"]: c for c in files["model.tar"]["checks"]}
    assert checks["sanitise"]["status"] == "pass", checks
    assert checks["membership"]["status"] in ("pass", "review") and "AUC" in checks["membership"]["reason"], checks
    # predict loaded the rounded model.tar (torch.load, unchanged code) and answered: both metrics are numbers
    metric = checks["sanitised-metric"]
    assert metric["status"] in ("pass", "review"), metric
    assert "as written" in metric["reason"] and "rounded" in metric["reason"], metric
    assert "predict failed" not in metric["reason"] and "not compared" not in metric["reason"], metric
    folder = Path(stack.env["M2D_DATA_DIR"]) / "submissions" / str(submission_id) / "disclosure"
    (named,) = [f for f in json.loads((folder / "report.json").read_text())["files"] if f["path"] == "model.tar"]
    held_out = named["sanitised"]["held_out"]
    for side in ("original", "rounded"):
        assert isinstance(held_out[side]["accuracy"], float) and held_out[side]["images"] > 0, held_out
    assert held_out["accuracy_drop"] == pytest.approx(held_out["original"]["accuracy"]
                                                      - held_out["rounded"]["accuracy"]), held_out
    assert held_out["max_auc_drop"] == 0.05
    # the attack on what leaves: predict's answers on the rounded model.tar, beside the original's
    attack = named["membership"]
    assert all(isinstance(attack[side].get("auc"), float) for side in ("original", "rounded")), attack
    assert "on the released (rounded) copy AUC" in checks["membership"]["reason"], checks["membership"]
