"""The portal in Debian's chromium against the running stack: the
researcher's and the admin's whole journey, and the security rules a browser
meets. Screenshots of each main page land in M2D_SCREENS (/tmp/m2d-screens)."""
import hashlib
import os
import re
import time
import uuid
from pathlib import Path

import pytest
import requests
from selenium import webdriver
from selenium.common.exceptions import (
    NoAlertPresentException,
    NoSuchElementException,
    StaleElementReferenceException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from gateway import create_app
from gateway.config import from_environment
from gateway.core.models import User
from gateway.extensions import db

from .helpers.manifest import reviewers_manifest
from .helpers.stack import SAMPLES, Stack, wait_for, zip_folder

PASSWORD = "correct horse battery staple"
SCREENS = Path(os.environ.get("M2D_SCREENS", "/tmp/m2d-screens"))


def chromium(profile, width=1280, height=900):
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.implicitly_wait(5)
    return driver


@pytest.fixture(scope="module")
def browsers(tmp_path_factory):
    made = []

    def make(width=1280, height=900):
        driver = chromium(tmp_path_factory.mktemp("chromium"), width, height)
        made.append(driver)
        return driver
    yield make
    for driver in made:
        driver.quit()


@pytest.fixture(scope="module")
def admin(stack, browsers):
    address = f"admin-{uuid.uuid4().hex[:8]}@example.org"
    stack.flask("users", "create", address, "--name", "Ada Admin", "--admin", "--approve", "--password", PASSWORD)
    driver = browsers()
    log_in(driver, stack, address)
    return driver


def shot(driver, name):
    SCREENS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SCREENS / f"{name}.png"))


def log_in(driver, stack, address, password=PASSWORD):
    driver.get(f"{stack.url}/login")
    driver.find_element(By.NAME, "email").send_keys(address)
    driver.find_element(By.NAME, "password").send_keys(password)
    driver.find_element(By.CSS_SELECTOR, "main button[type=submit]").click()
    WebDriverWait(driver, 15).until(lambda d: "/login" not in d.current_url or d.find_elements(By.CSS_SELECTOR, ".flash.error"))


def text(driver, css="main"):
    return driver.find_element(By.CSS_SELECTOR, css).text


def until(driver, predicate, timeout=15):
    # the live region is replaced while we look: a vanished element means "look again"
    def look(d):
        try:
            return predicate(d)
        except WebDriverException as e:
            # chromedriver's other word for a stale element, when the node is replaced as its text is read
            if "does not belong to the document" in str(e):
                return False
            raise
    return WebDriverWait(driver, timeout, poll_frequency=0.5,
                         ignored_exceptions=(StaleElementReferenceException, NoSuchElementException)
                         ).until(look)


def sign_up(driver, stack, address, name):
    driver.get(f"{stack.url}/signup")
    shot(driver, "01-signup")
    for field, value in (("name", name), ("email", address), ("affiliation", "St. Elsewhere Hospital"),
                         ("intended_use", "Detect calcifications on mammograms."), ("password", PASSWORD)):
        driver.find_element(By.NAME, field).send_keys(value)
    driver.find_element(By.CSS_SELECTOR, "main button[type=submit]").click()
    until(driver, lambda d: "Check your inbox" in text(d, "h1"))


def mail_link(stack, address, subject_part, pattern):
    message = wait_for(lambda: next((m for m in stack.mails_to(address) if subject_part in m["Subject"]), None),
                       60, f"the '{subject_part}' email to {address}")
    body = message.get_body(preferencelist=("plain",)).get_content()
    return body, (re.search(pattern, body).group(0) if pattern else None)


def mark_page(driver):
    """A flag in the page's window: still there later means no reload happened."""
    driver.execute_script("window.__noReload = 'yes';")


def not_reloaded(driver):
    return driver.execute_script("return window.__noReload;") == "yes"


def status_of(driver):
    return driver.find_element(By.CSS_SELECTOR, "#live .status").get_attribute("data-status")


def test_sign_up_verify_approve_log_in_and_watch_the_iris_sample_complete(stack, app, browsers, admin, tmp_path):
    researcher = browsers()
    address = f"newcomer-{uuid.uuid4().hex[:8]}@example.org"
    sign_up(researcher, stack, address, "Nina Newcomer")
    shot(researcher, "02-signup-sent")

    _, link = mail_link(stack, address, "Confirm your email", r"http\S+/verify/\S+")
    researcher.get(link)
    until(researcher, lambda d: "email address is confirmed" in text(d))

    admin.get(f"{stack.url}/admin/users")
    assert "Detect calcifications on mammograms." in text(admin)
    shot(admin, "03-admin-accounts-pending")
    admin.find_element(By.XPATH, f"//button[normalize-space()='Approve {address}']").click()
    until(admin, lambda d: "is approved" in text(d, ".flashes"), timeout=60)
    body, _ = mail_link(stack, address, "approved", None)
    assert "/account" in body

    log_in(researcher, stack, address)
    assert text(researcher, "h1") == "My submissions"
    assert "Try the iris sample first" in text(researcher)
    shot(researcher, "04-my-submissions-empty")

    researcher.get(f"{stack.url}/account")
    password = researcher.find_element(By.ID, "mlflow-password")
    assert not password.is_displayed()
    researcher.find_element(By.CSS_SELECTOR, "[data-reveal=mlflow-password]").click()
    until(researcher, lambda d: password.is_displayed())
    db.session.expire_all()
    user = db.session.execute(db.select(User).filter_by(email=address)).scalar_one()
    assert researcher.find_element(By.ID, "mlflow-username").text == user.mlflow_username
    assert password.text == user.mlflow_password
    shot(researcher, "05-account")

    researcher.get(f"{stack.url}/upload")
    shot(researcher, "06-upload")
    researcher.find_element(By.NAME, "file").send_keys(str(zip_folder(SAMPLES / "iris", tmp_path / "iris.zip")))
    researcher.find_element(By.CSS_SELECTOR, "form[enctype] button[type=submit]").click()
    until(researcher, lambda d: text(d, "h1").startswith("Submission "))
    mark_page(researcher)
    shot(researcher, "07-detail-active")
    until(researcher, lambda d: status_of(d) == "completed", timeout=900)
    assert not_reloaded(researcher)
    timeline = text(researcher, ".timeline")
    for status in ("received", "building", "queued", "running", "completed"):
        assert status in timeline
    assert researcher.find_element(By.XPATH, "//dt[text()='Slurm job']/following-sibling::dd[1]").text.isdigit()
    shot(researcher, "08-detail-completed")
    researcher.get(f"{stack.url}/")
    assert "completed" in text(researcher, "table")
    shot(researcher, "09-my-submissions")

    narrow = browsers(390, 844)
    log_in(narrow, stack, address)
    narrow.get(researcher.current_url if "/submissions/" in researcher.current_url else f"{stack.url}/")
    shot(narrow, "10-my-submissions-phone")


def test_an_admin_cancels_a_running_job_and_the_researchers_page_shows_it(stack, browsers, admin, tmp_path):
    owner = stack.researcher("sleeper", password=PASSWORD)
    submission_id = owner.submit(zip_folder(SAMPLES / "sleeps", tmp_path / "sleeps.zip"))
    page = browsers()
    log_in(page, stack, owner.address)
    page.get(f"{stack.url}/submissions/{submission_id}")
    mark_page(page)
    job_id = owner.wait_until(submission_id, "running", timeout=600)["slurm_job_id"]

    admin.get(f"{stack.url}/admin/cluster")
    row = admin.find_element(By.ID, f"job-{job_id}")
    assert "RUNNING" in row.text and f"-{submission_id}" in row.text
    shot(admin, "11-admin-cluster")
    row.find_element(By.CSS_SELECTOR, "button.danger").click()
    until(admin, lambda d: "being cancelled" in text(d, ".flashes"))

    until(page, lambda d: status_of(d) == "cancelled", timeout=120)
    assert not_reloaded(page)
    assert "cancelled" in text(page, ".timeline")
    shot(page, "12-detail-cancelled-by-admin")

    admin.get(f"{stack.url}/admin/submissions?user={owner.address}")
    assert "cancelled" in text(admin, "table")
    shot(admin, "13-admin-submissions")
    admin.get(f"{stack.url}/admin/submissions/{submission_id}")
    assert owner.address in text(admin)


def test_a_rejected_applicant_gets_the_reason_by_email(stack, browsers, admin):
    applicant = browsers()
    address = f"applicant-{uuid.uuid4().hex[:8]}@example.org"
    sign_up(applicant, stack, address, "Rex Rejected")
    _, link = mail_link(stack, address, "Confirm your email", r"http\S+/verify/\S+")
    applicant.get(link)
    admin.get(f"{stack.url}/admin/users")
    card = admin.find_element(By.XPATH, f"//article[.//h3[contains(., '{address}')]]")
    card.find_element(By.NAME, "reason").send_keys("The project has no ethics approval yet.")
    card.find_element(By.XPATH, ".//button[normalize-space()='Reject']").click()
    until(admin, lambda d: "is rejected" in text(d, ".flashes"))
    body, _ = mail_link(stack, address, "not approved", None)
    assert "The project has no ethics approval yet." in body


def test_a_researcher_cannot_see_or_act_on_anothers_submission(stack, browsers, tmp_path):
    owner = stack.researcher("owner", password=PASSWORD)
    other = stack.researcher("other", password=PASSWORD)
    theirs = owner.submit(zip_folder(SAMPLES / "sleeps", tmp_path / "theirs.zip"))
    driver = browsers()
    log_in(driver, stack, other.address)
    for path in (f"/submissions/{theirs}", f"/submissions/{theirs}/live"):
        driver.get(f"{stack.url}{path}")
        assert "Not Found" in driver.title or "Not Found" in text(driver, "body"), path
    shot(driver, "14-not-found")
    session = requests.Session()
    for cookie in driver.get_cookies():
        session.cookies.set(cookie["name"], cookie["value"])
    token = re.search(r'name="csrf_token" value="([^"]+)"', session.get(f"{stack.url}/account").text).group(1)
    for action in ("cancel", "resubmit"):
        response = session.post(f"{stack.url}/submissions/{theirs}/{action}", data={"csrf_token": token})
        assert response.status_code == 404, action
    assert owner.submission(theirs)["status"] != "cancelled"
    owner.api("POST", f"/submissions/{theirs}/cancel")


def test_the_sixth_wrong_password_within_a_minute_is_refused(stack):
    victim = stack.researcher("victim", password=PASSWORD)
    session = requests.Session()

    def attempt(password):
        token = re.search(r'name="csrf_token" value="([^"]+)"', session.get(f"{stack.url}/login").text).group(1)
        return session.post(f"{stack.url}/login", allow_redirects=False,
                            data={"csrf_token": token, "email": victim.address, "password": password})
    started = time.monotonic()
    for _ in range(5):
        assert attempt("not the password").status_code == 401
    refused = attempt(PASSWORD)
    assert time.monotonic() - started < 60
    assert refused.status_code == 429 and "Too many attempts" in refused.text


def test_forms_without_a_csrf_token_are_refused(stack):
    victim = stack.researcher("csrf", password=PASSWORD)
    for path, data in (("/login", {"email": victim.address, "password": PASSWORD}),
                       ("/signup", {"name": "X", "email": "x@example.org", "affiliation": "Y",
                                    "intended_use": "Z", "password": PASSWORD})):
        response = requests.post(f"{stack.url}{path}", data=data, allow_redirects=False)
        assert response.status_code == 400 and "CSRF" in response.text, path


def test_a_zip_named_like_html_shows_as_text(stack, browsers, tmp_path):
    owner = stack.researcher("named", password=PASSWORD)
    name = "<img src=x onerror=alert(1)>.zip"
    driver = browsers()
    log_in(driver, stack, owner.address)
    driver.get(f"{stack.url}/upload")
    driver.find_element(By.NAME, "file").send_keys(str(zip_folder(SAMPLES / "fails", tmp_path / name)))
    driver.find_element(By.CSS_SELECTOR, "form[enctype] button[type=submit]").click()
    until(driver, lambda d: text(d, "h1").startswith("Submission "))
    for _ in range(2):
        assert driver.find_element(By.CSS_SELECTOR, ".file").text == name
        assert not driver.find_elements(By.CSS_SELECTOR, "main img")
        with pytest.raises(NoAlertPresentException):
            driver.switch_to.alert.text  # noqa: B018
        driver.get(f"{stack.url}/")
    shot(driver, "15-hostile-name-as-text")
    submission_id = int(driver.find_element(By.CSS_SELECTOR, "tbody a").text.lstrip("#"))
    owner.api("POST", f"/submissions/{submission_id}/cancel")


# ---------------------------------------------------------------- the export airlock in the browser

@pytest.fixture(scope="module")
def two_person_stack(testbed):
    """A stack of its own with the two-person rule (M2D_RELEASE_APPROVALS=2): the
    web server reads the setting when it starts."""
    running = Stack(M2D_RELEASE_APPROVALS="2").start()
    yield running
    running.stop()


# the decision form a page without one would have sent, with the page's own CSRF token
FORGED_DECISION = """
const [action, path, decision] = arguments;
const form = Object.assign(document.createElement('form'), {method: 'post', action});
const fields = {csrf_token: document.querySelector('input[name=csrf_token]').value, path, decision};
for (const [name, value] of Object.entries(fields)) {
  form.appendChild(Object.assign(document.createElement('input'), {type: 'hidden', name, value}));
}
document.body.appendChild(form);
form.submit();
"""


def downloads_into(driver, folder):
    folder.mkdir(parents=True, exist_ok=True)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(folder)})
    return folder


def release_item(driver, path):
    return driver.find_element(By.XPATH, f"//article[contains(@class, 'release-item')][.//h3/code[text()='{path}']]")


def decide_in_page(driver, path, decision, comment=""):
    item = release_item(driver, path)
    if comment:
        item.find_element(By.NAME, "comment").send_keys(comment)
    item.find_element(By.CSS_SELECTOR, f"button[value={decision}]").click()
    until(driver, lambda d: f"Recorded: {decision} {path}" in text(d, ".flashes"))


def test_a_release_is_requested_reviewed_by_two_and_downloaded_in_the_browser(two_person_stack, browsers, tmp_path):
    stack = two_person_stack
    owner = stack.researcher("exporter", password=PASSWORD, dry_run=False)
    first, second = (stack.researcher(name, password=PASSWORD) for name in ("rev-ann", "rev-ben"))
    for person in (owner, first, second):  # the owner is a reviewer too: never of her own files
        stack.flask("users", "grant-reviewer", person.address)
    submission_id = owner.submit(zip_folder(SAMPLES / "exports", tmp_path / "exports.zip"))
    assert owner.wait_until(submission_id, {"completed", "failed", "build_failed"})["status"] == "completed"
    # the manifest, as the reviewers have it (the gateway's database)
    with create_app(from_environment(stack.env)).app_context():
        manifest = {path: {"sha256": f.sha256, "size": f.size} for path, f in reviewers_manifest(submission_id).items()}
    assert set(manifest) == {"metrics.json", "model.bin", "predictions.csv"}

    # the researcher sees how many files, not which; asks for them, saying which two she needs
    researcher = browsers()
    log_in(researcher, stack, owner.address)
    researcher.get(f"{stack.url}/submissions/{submission_id}")
    export = text(researcher, "#export")
    assert "3 file(s)" in export
    for path, listed in manifest.items():
        assert path not in export and listed["sha256"] not in export
    researcher.find_element(By.ID, "justification").send_keys(
        "model.bin and predictions.csv: the trained model and its predictions, for a paper.")
    shot(researcher, "20-export-request")
    researcher.find_element(By.XPATH, "//section[@id='export']//button[starts-with(normalize-space(), "
                                      "'Request release')]").click()
    until(researcher, lambda d: "sent to the reviewers" in text(d, ".flashes"))
    request_id = re.search(r"Release request (\d+)", text(researcher, ".flashes")).group(1)
    assert "pending" in text(researcher, ".release-requests")

    # each other reviewer gets the "request received" email with the page to review it; the owner none
    for person in (first, second):
        body, link = mail_link(stack, person.address, f"release requested (request {request_id})",
                               rf"http\S+/review/requests/{request_id}")
        assert "model.bin" in body and "predictions.csv" in body and "for a paper" in body
    assert not [m for m in stack.mails_to(owner.address) if "release requested" in m["Subject"]]

    # the first reviewer: the request, its files with previews and hashes, the code that made them
    ann = browsers()
    log_in(ann, stack, first.address)
    ann.find_element(By.LINK_TEXT, "Release requests").click()
    until(ann, lambda d: text(d, "h1") == "Release requests")
    shot(ann, "21-review-pending")
    ann.find_element(By.LINK_TEXT, f"Request {request_id}").click()
    until(ann, lambda d: text(d, "h1") == f"Release request {request_id}")
    assert "for a paper" in text(ann)
    for path in ("model.bin", "predictions.csv"):
        assert manifest[path]["sha256"] in release_item(ann, path).text
    assert "P0003,1" in release_item(ann, "predictions.csv").find_element(By.CSS_SELECTOR, "pre.preview").text
    assert "No preview" in release_item(ann, "model.bin").text
    shot(ann, "22-review-request")
    ann.find_element(By.PARTIAL_LINK_TEXT, "The code that produced these files").click()
    ann.find_element(By.LINK_TEXT, "main.py").click()
    until(ann, lambda d: "def model_bytes" in text(d, "pre.code"))
    shot(ann, "23-review-code")

    # two-person rule: one approval leaves the model pending; a rejection rejects at once
    ann.get(f"{stack.url}/review/requests/{request_id}")
    decide_in_page(ann, "model.bin", "approve", "The model weights, no row-level data.")
    assert release_item(ann, "model.bin").find_element(By.CSS_SELECTOR, ".item-status").text == "pending"
    decide_in_page(ann, "predictions.csv", "reject", "Row-level predictions per patient may not leave.")
    assert release_item(ann, "predictions.csv").find_element(By.CSS_SELECTOR, ".item-status").text == "rejected"
    decide_in_page(ann, "metrics.json", "reject", "Not asked for.")
    assert owner.api("GET", f"/submissions/{submission_id}/export/model.bin").status_code == 404

    # the owner, a reviewer herself, cannot approve her own files: no buttons, and a forged form is refused
    own = browsers()
    log_in(own, stack, owner.address)
    own.get(f"{stack.url}/review/requests/{request_id}")
    assert "This is your own submission" in text(own)
    assert not own.find_elements(By.CSS_SELECTOR, "button[value=approve]")
    own.execute_script(FORGED_DECISION, f"/review/requests/{request_id}/decide", "model.bin", "approve")
    until(own, lambda d: "Nobody reviews the release of their own files" in text(d, ".flashes"))
    assert release_item(own, "model.bin").find_element(By.CSS_SELECTOR, ".item-status").text == "pending"
    shot(own, "24-review-own-request")

    # the second reviewer's approval releases it
    ben = browsers()
    log_in(ben, stack, second.address)
    ben.get(f"{stack.url}/review/requests/{request_id}")
    decide_in_page(ben, "model.bin", "approve", "Agreed.")
    assert release_item(ben, "model.bin").find_element(By.CSS_SELECTOR, ".item-status").text == "released"
    assert text(ben, ".release-status") == "partly_released"
    shot(ben, "25-review-decided")

    # the researcher's emails: the decision with every comment, then the download
    body, _ = mail_link(stack, owner.address, f"release request {request_id} partly released", None)
    for said in ("model.bin: released", "The model weights, no row-level data.", "Agreed.",
                 "2 file(s) not released", "Row-level predictions per patient may not leave.", "Not asked for."):
        assert said in body, said
    assert "predictions.csv" not in body and "metrics.json" not in body  # never released: never named
    body, link = mail_link(stack, owner.address, f"download available (request {request_id})",
                           rf"http\S+/submissions/{submission_id}/export/model\.bin")
    assert "predictions.csv" not in body and manifest["model.bin"]["sha256"] in body

    # the released file downloads in the browser, byte for byte; the rejected one does not
    folder = downloads_into(researcher, tmp_path / "downloads")
    researcher.get(f"{stack.url}/submissions/{submission_id}")
    assert not researcher.find_elements(By.XPATH, "//section[@id='export']//tr[.//code[text()='predictions.csv']]")
    shot(researcher, "26-export-released")
    researcher.find_element(By.XPATH, "//tr[.//code[text()='model.bin']]//a[contains(@class, 'download')]").click()
    got = wait_for(lambda: (f := folder / "model.bin").is_file() and not list(folder.glob("*.crdownload")) and f,
                   120, "chromium to save model.bin")
    data = got.read_bytes()
    assert len(data) == manifest["model.bin"]["size"]
    assert hashlib.sha256(data).hexdigest() == manifest["model.bin"]["sha256"]
    assert data == b"".join(hashlib.sha256(b"block %d" % i).digest() for i in range(3 * 1024 * 1024 // 32))
    researcher.get(link.replace("model.bin", "predictions.csv"))
    assert "has no released file" in text(researcher, "body")
    assert not (folder / "predictions.csv").exists()
    shot(researcher, "27-rejected-not-downloadable")
