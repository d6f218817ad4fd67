"""The researcher's pages in a real browser (Debian's chromium, headless)."""
import pytest
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from .helpers import zips
from .helpers.stack import SAMPLES, zip_folder

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.implicitly_wait(5)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def logged_in(stack, browser):
    researcher = stack.researcher("webuser", password=PASSWORD)
    browser.get(f"{stack.url}/login")
    browser.find_element(By.NAME, "email").send_keys(researcher.address)
    browser.find_element(By.NAME, "password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    heading(browser, lambda text: text == "My submissions")
    return researcher


def heading(browser, expected):
    """The page's h1 once it satisfies ``expected`` (clicks load pages asynchronously)."""
    def ready(driver):
        try:
            text = driver.find_element(By.TAG_NAME, "h1").text
        except (NoSuchElementException, StaleElementReferenceException):
            return False
        return text if expected(text) else False
    return WebDriverWait(browser, 15, ignored_exceptions=(StaleElementReferenceException,)).until(ready)


def _upload(browser, stack, path):
    browser.get(f"{stack.url}/upload")
    browser.find_element(By.NAME, "file").send_keys(str(path))
    browser.find_element(By.CSS_SELECTOR, "form[enctype] button[type=submit]").click()


def test_wrong_password_is_refused_on_the_page(stack, browser):
    browser.get(f"{stack.url}/login")
    browser.find_element(By.NAME, "email").send_keys("nobody@example.org")
    browser.find_element(By.NAME, "password").send_keys("wrong password!!")
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    assert "Wrong email or password" in browser.find_element(By.CSS_SELECTOR, ".flash.error").text


def test_upload_through_the_form_creates_a_submission(stack, browser, logged_in, tmp_path):
    _upload(browser, stack, zip_folder(SAMPLES / "fails", tmp_path / "form.zip"))
    title = heading(browser, lambda text: text.startswith("Submission "))
    submission_id = int(title.split()[-1])
    assert logged_in.submission(submission_id)["filename"] == "form.zip"
    assert "received" in browser.find_element(By.CSS_SELECTOR, ".flash").text


def test_a_bad_zip_shows_what_to_fix_on_the_page(stack, browser, logged_in, tmp_path):
    _upload(browser, stack, zips.make_nested_zip(tmp_path / "nested.zip", folder="my-project"))
    message = browser.find_element(By.CSS_SELECTOR, ".flash.error").text  # beside the form
    assert "my-project" in message


def test_account_page_shows_mlflow_credentials(stack, browser, logged_in):
    browser.get(f"{stack.url}/account")
    browser.find_element(By.CSS_SELECTOR, "[data-reveal]").click()  # hidden until revealed
    mlflow = logged_in.me()["mlflow"]
    page = browser.find_element(By.TAG_NAME, "body").text
    assert mlflow["username"] in page and mlflow["password"] in page


def test_cancel_button_cancels_the_submission(stack, browser, logged_in, tmp_path):
    _upload(browser, stack, zip_folder(SAMPLES / "sleeps", tmp_path / "sleeps.zip"))
    submission_id = int(heading(browser, lambda text: text.startswith("Submission ")).split()[-1])
    browser.find_element(By.XPATH, "//button[text()='Cancel this submission']").click()
    WebDriverWait(browser, 15, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda d: "being cancelled" in d.find_element(By.TAG_NAME, "body").text)
    assert logged_in.wait_until(submission_id, {"cancelled", "completed", "failed"}, timeout=120)[
        "status"] == "cancelled"
