"""The daily quota: each run can carry something out, so a researcher gets
DAILY_SUBMISSIONS uploads in any 24 hours, then a refusal that says when the
next slot frees and that the admins can raise the limit."""
import re
from datetime import datetime, timedelta

import pytest

from gateway.core import accounts
from gateway.core.models import ApiToken, Submission, User, utcnow
from gateway.extensions import db

from .helpers.stack import SAMPLES, zip_folder

# the production database too (PostgreSQL: the integration tier)
pytestmark = pytest.mark.databases("sqlite", "postgresql")


def earlier_uploads(user_id, *ages, status="cancelled"):
    """Submissions of ``user_id`` created ``ages`` ago, ended (cancelled by
    default), so nothing tries to run them."""
    for age in ages:
        db.session.add(Submission(user_id=user_id, status=status, filename="earlier.zip",
                                  created_at=utcnow() - age, updated_at=utcnow() - age))
    db.session.commit()


def frees_at(message):
    found = re.search(r"from (\d{4}-\d\d-\d\d \d\d:\d\d) UTC", message)
    assert found, message
    return datetime.strptime(found.group(1), "%Y-%m-%d %H:%M")


@pytest.fixture
def dora(local_app):
    user = accounts.create_user("dora@example.org", "Dora")
    user.approved_at = utcnow()
    db.session.commit()
    token = ApiToken.issue(user)
    db.session.commit()
    return user.id, {"Authorization": f"Bearer {token}"}


@pytest.fixture
def iris_zip(tmp_path):
    return zip_folder(SAMPLES / "iris", tmp_path / "iris.zip")


def upload(client, headers, path):
    return client.post("/api/v1/submissions", headers=headers, data={"file": (path.open("rb"), "iris.zip")})


def test_the_21st_upload_in_24_hours_is_refused_with_429_saying_when_and_who_can_raise_it(
        client, dora, iris_zip):
    user_id, headers = dora
    oldest = timedelta(hours=23, minutes=30)
    earlier_uploads(user_id, oldest, *[timedelta(hours=h) for h in range(1, 19)])
    assert upload(client, headers, iris_zip).status_code == 201  # the 20th

    response = upload(client, headers, iris_zip)
    assert response.status_code == 429
    body = response.json
    assert body["error"] == "quota_exceeded"
    assert "the limit is 20 a day" in body["message"] and "admins" in body["message"]
    # the oldest of the 20 leaves the window in 30 minutes: that minute, not earlier
    expected = utcnow() - oldest + timedelta(hours=24)
    assert timedelta(0) <= frees_at(body["message"]) - expected.replace(second=0, microsecond=0) <= timedelta(minutes=1)
    assert Submission.query.filter_by(user_id=user_id).count() == 20  # nothing recorded


def test_uploads_older_than_24_hours_do_not_count(client, dora, iris_zip):
    user_id, headers = dora
    earlier_uploads(user_id, *[timedelta(hours=24, minutes=m) for m in range(1, 30)])
    earlier_uploads(user_id, *[timedelta(hours=h) for h in range(1, 20)])
    assert upload(client, headers, iris_zip).status_code == 201


def test_submissions_whose_dry_run_failed_count_against_the_quota(client, local_app, dora, iris_zip):
    """A failed dry run is not free: the gateway read what it wrote, and a free
    retry is a retry without limit (issue 21)."""
    user_id, headers = dora
    local_app.config["DAILY_SUBMISSIONS"] = 3
    earlier_uploads(user_id, *[timedelta(hours=h) for h in range(1, 3)], status="dry_run_failed")
    assert upload(client, headers, iris_zip).status_code == 201  # 2 failed dry runs + this one
    refused = upload(client, headers, iris_zip)
    assert refused.status_code == 429 and refused.json["error"] == "quota_exceeded"


def test_the_quota_is_per_user_and_configurable(client, local_app, dora, iris_zip):
    user_id, headers = dora
    local_app.config["DAILY_SUBMISSIONS"] = 2
    other = accounts.create_user("eve@example.org", "Eve")
    earlier_uploads(other.id, timedelta(hours=1), timedelta(hours=2), timedelta(hours=3))
    assert upload(client, headers, iris_zip).status_code == 201
    assert upload(client, headers, iris_zip).status_code == 201
    refused = upload(client, headers, iris_zip)
    assert refused.status_code == 429 and "the limit is 2 a day" in refused.json["message"]


def test_the_web_form_shows_the_same_refusal(client, local_app, dora, iris_zip):
    user_id, _ = dora
    local_app.config["DAILY_SUBMISSIONS"] = 1
    local_app.config["WTF_CSRF_ENABLED"] = False
    earlier_uploads(user_id, timedelta(minutes=5))
    with client.session_transaction() as session:
        session["_user_id"] = str(user_id)
        session["_fresh"] = True
    response = client.post("/", data={"file": (iris_zip.open("rb"), "iris.zip")})
    assert response.status_code == 400
    assert "the limit is 1 a day" in response.get_data(as_text=True)


def test_on_the_stack_the_upload_past_the_quota_is_refused(stack, app, tmp_path):
    quota = int(stack.env.get("M2D_DAILY_SUBMISSIONS", 20))
    frank = stack.researcher("frank")
    user_id = User.query.filter_by(email=frank.address).one().id
    earlier_uploads(user_id, *[timedelta(minutes=10 + i) for i in range(quota)])
    response = frank.upload(zip_folder(SAMPLES / "fails", tmp_path / "fails.zip"))
    assert response.status_code == 429, response.text
    assert response.json()["error"] == "quota_exceeded"
    message = response.json()["message"]
    assert f"the limit is {quota} a day" in message and "admins" in message
    assert frees_at(message) > utcnow() + timedelta(hours=23)
