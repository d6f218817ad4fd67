"""The portal's rules through Flask's test client (no services): sign-up
limits and no enumeration, single-use expiring links, admin pages and their
guards, disabled accounts, rate limits, cookies and headers, tokens,
ownership, escaping and error pages."""
import re
from types import SimpleNamespace

import pytest

from gateway.core import accounts, lifecycle
from gateway.core.models import AccountEmail, ApiToken, Submission, User, utcnow
from gateway.extensions import db
from jobs import mail

from .helpers.users import PASSWORD, csrf, fresh, log_in, make_user, post


def signup_form(**overrides):
    return {"name": "Ada Lovelace", "email": "ada@example.org", "affiliation": "Analytical Engines",
            "intended_use": "Calcification detection.", "password": PASSWORD, **overrides}


class FakeMailer:
    def __init__(self):
        self.sent = []

    def send(self, to, subject, body, message_id=None, accepted=None):
        self.sent.append((to, subject, body))
        if accepted:
            accepted()


def sent_account_mail(user, kind):
    """Send the owed email of ``kind`` through jobs.mail, as the worker does."""
    row = AccountEmail.query.filter_by(user_id=user.id, kind=kind).order_by(AccountEmail.id.desc()).first()
    assert row is not None, f"no {kind} email owed to {user.email}"
    mailer = FakeMailer()
    assert mail.send_account(row.id, mailer) is True
    return mailer.sent[0]


@pytest.fixture
def admin(local_app):
    return make_user("admin@example.org", admin=True)


@pytest.fixture
def provisioned(monkeypatch):
    """MLflow answers approvals (the real one is tested in test_mlflow)."""
    class FakeAdmin:
        def provision(self, username, **_):
            return SimpleNamespace(username=username, password="mlflow-secret-1", experiment_id="7",
                                   experiment_name=username, dry_run_experiment_id="8")
    monkeypatch.setattr("gateway.core.accounts.MlflowAdmin.from_config", lambda cfg: FakeAdmin())


# ------------------------------------------------------------------ sign-up

def test_sign_up_refuses_a_million_character_name_and_stores_nothing(client):
    response = post(client, "/signup", signup_form(name="x" * 1_000_000))
    assert response.status_code in (400, 413)
    assert User.query.count() == 0


@pytest.mark.parametrize("field,limit", [("name", 200), ("affiliation", 200), ("intended_use", 2000)])
def test_sign_up_enforces_each_field_length(client, field, limit):
    assert post(client, "/signup", signup_form(**{field: "y" * (limit + 1)})).status_code == 400
    assert post(client, "/signup", signup_form(**{field: "y" * limit})).status_code == 200
    assert len(getattr(User.query.one(), field)) == limit


def test_sign_up_refuses_a_short_password(client):
    response = post(client, "/signup", signup_form(password="short"))
    assert response.status_code == 400 and "at least 12 characters" in response.get_data(as_text=True)


def test_sign_up_does_not_reveal_whether_an_email_is_registered(client, local_app):
    make_user("taken@example.org")
    fresh = post(client, "/signup", signup_form(email="new@example.org"))
    taken = post(client, "/signup", signup_form(email="taken@example.org"))
    assert fresh.status_code == taken.status_code == 200

    def words(response, address):
        return re.sub(r"\s+", " ", response.get_data(as_text=True)).replace(address, "ADDRESS")
    page_fresh, page_taken = words(fresh, "new@example.org"), words(taken, "taken@example.org")
    # the pages differ only in the CSRF token
    strip = re.compile(r'value="[^"]+" name="csrf_token"|name="csrf_token" value="[^"]+"')
    assert strip.sub("", page_fresh) == strip.sub("", page_taken)
    assert User.query.filter_by(email="taken@example.org").count() == 1
    assert AccountEmail.query.filter_by(kind="verify").count() == 1  # only the new address


def test_verification_link_works_once_then_the_account_waits_for_approval(client, local_app):
    post(client, "/signup", signup_form())
    user = User.query.filter_by(email="ada@example.org").one()
    to, subject, body = sent_account_mail(user, "verify")
    assert to == "ada@example.org" and "Confirm" in subject
    link = re.search(r"http\S+/verify/\S+", body).group(0)
    path = link.split("127.0.0.1:5000", 1)[1]

    assert log_in(client, "ada@example.org").status_code == 403  # not verified yet
    assert client.get(path).status_code == 302
    db.session.refresh(user)
    assert user.email_verified_at is not None and not user.approved
    second = client.get(path)
    assert second.status_code == 400 and "used already" in second.get_data(as_text=True)
    refused = log_in(client, "ada@example.org")
    assert refused.status_code == 403 and "waiting for an admin" in refused.get_data(as_text=True)


def test_verification_link_expires(client, local_app):
    post(client, "/signup", signup_form())
    user = User.query.one()
    token = accounts.verification_token(user)
    local_app.config["VERIFY_MAX_AGE"] = -1
    response = client.get(f"/verify/{token}")
    assert response.status_code == 400 and "expired" in response.get_data(as_text=True)


def test_a_forged_link_is_refused(client, local_app):
    assert client.get("/verify/not-a-token").status_code == 400
    assert client.get("/reset/not-a-token").status_code == 400


# ----------------------------------------------------------------- admin

def test_admin_pages_send_anonymous_visitors_to_log_in(client):
    for path in ("/admin/users", "/admin/submissions", "/admin/cluster", "/admin/submissions/1"):
        response = client.get(path)
        assert response.status_code == 302 and "/login" in response.headers["Location"], path
    assert client.post("/admin/users/1/approve").status_code in (302, 400)


def test_admin_pages_are_403_for_researchers_in_the_site_layout(client, local_app):
    make_user("res@example.org")
    log_in(client, "res@example.org")
    for path in ("/admin/users", "/admin/submissions", "/admin/submissions/1"):
        response = client.get(path)
        assert response.status_code == 403, path
        assert "for admins only" in response.get_data(as_text=True)
        assert 'href="/static/site.css"' in response.get_data(as_text=True)
    victim = make_user("victim@example.org", approved=False)
    assert post(client, f"/admin/users/{victim.id}/approve", {}, page="/account").status_code == 403
    db.session.refresh(victim)
    assert not victim.approved


def test_admin_approves_a_verified_applicant_who_gets_an_email(client, admin, provisioned):
    post(client, "/signup", signup_form())
    applicant = User.query.filter_by(email="ada@example.org").one()
    applicant.email_verified_at = utcnow()
    db.session.commit()
    log_in(client, admin.email)
    page = client.get("/admin/users").get_data(as_text=True)
    assert "Ada Lovelace" in page and "Calcification detection." in page
    assert post(client, f"/admin/users/{applicant.id}/approve", {}, page="/admin/users").status_code == 302
    db.session.refresh(applicant)
    assert applicant.approved and applicant.mlflow_password == "mlflow-secret-1"
    _, subject, body = sent_account_mail(applicant, "approved")
    assert "approved" in subject and "/account" in body
    # approving twice owes no second email
    post(client, f"/admin/users/{applicant.id}/approve", {}, page="/admin/users")
    assert AccountEmail.query.filter_by(user_id=applicant.id, kind="approved").count() == 1


def test_rejection_needs_a_reason_and_emails_it(client, admin):
    applicant = make_user("no@example.org", approved=False)
    applicant.email_verified_at = utcnow()
    db.session.commit()
    log_in(client, admin.email)
    post(client, f"/admin/users/{applicant.id}/reject", {"reason": ""}, page="/admin/users")
    db.session.refresh(applicant)
    assert applicant.rejected_at is None
    post(client, f"/admin/users/{applicant.id}/reject", {"reason": "Not a <b>clinical</b> project."},
         page="/admin/users")
    _, subject, body = sent_account_mail(applicant, "rejected")
    assert "not approved" in subject and "Not a <b>clinical</b> project." in body
    assert "not approved" in log_in(client, applicant.email).get_data(as_text=True)


def test_a_disabled_user_cannot_log_in_submit_or_use_tokens_and_their_jobs_are_cancelled(client, admin):
    user = make_user("gone@example.org")
    token = ApiToken.issue(user, name="laptop")
    submission = lifecycle.create(user, "waiting.zip")
    db.session.commit()
    researcher = local_client = client.application.test_client()
    log_in(researcher, user.email)
    assert researcher.get("/account").status_code == 200

    log_in(client, admin.email)
    post(client, f"/admin/users/{user.id}/disable", {}, page="/admin/users")
    db.session.refresh(submission)
    assert submission.status == "cancelled"
    assert "by an admin" in submission.events[-1].detail

    fresh()
    assert local_client.get("/account").status_code == 302  # the live session is over
    assert log_in(researcher, user.email).status_code == 403
    api = researcher.get("/api/v1/submissions", headers={"Authorization": f"Bearer {token}"})
    assert api.status_code == 403 and "disabled" in api.json["message"]

    post(client, f"/admin/users/{user.id}/enable", {}, page="/admin/users")
    assert log_in(researcher, user.email).status_code == 302


def test_admin_sees_every_submission_filtered_and_its_detail(client, admin):
    alice, bob = make_user("alice@example.org"), make_user("bob@example.org")
    for owner, name in ((alice, "a.zip"), (bob, "b.zip")):
        lifecycle.create(owner, name)
    db.session.commit()
    log_in(client, admin.email)
    page = client.get("/admin/submissions?user=bob").get_data(as_text=True)
    assert "b.zip" in page and "a.zip" not in page
    assert "a.zip" in client.get("/admin/submissions?status=received").get_data(as_text=True)
    assert "No submission matches" in client.get("/admin/submissions?status=completed").get_data(as_text=True)
    assert "No submission matches" in client.get("/admin/submissions?from=2999-01-01").get_data(as_text=True)
    first = Submission.query.filter_by(filename="a.zip").one()
    assert "alice@example.org" in client.get(f"/admin/submissions/{first.id}").get_data(as_text=True)


# ------------------------------------------------------------ rate limits

def test_the_sixth_wrong_password_within_a_minute_is_refused_even_when_right(client, local_app):
    make_user("target@example.org")
    for _ in range(5):
        assert log_in(client, "target@example.org", "wrong password!!").status_code == 401
    refused = log_in(client, "target@example.org")
    assert refused.status_code == 429 and "Too many attempts" in refused.get_data(as_text=True)


def test_a_right_password_does_not_count_against_the_limit(client, local_app):
    make_user("fine@example.org")
    for _ in range(8):
        assert log_in(client, "fine@example.org").status_code == 302
        client.post("/logout", data={"csrf_token": csrf(client, "/account")})


def test_one_address_trying_many_accounts_is_refused(client, local_app):
    local_app.config["LOGIN_LIMIT_ADDRESS"] = "3 per minute"
    for n in range(3):
        assert log_in(client, f"guess{n}@example.org", "wrong password!!").status_code == 401
    assert log_in(client, "guess9@example.org", "wrong password!!").status_code == 429


def test_sign_up_and_reset_requests_are_limited(client, local_app):
    local_app.config["SIGNUP_LIMIT"] = "2 per hour"
    local_app.config["RESET_LIMIT"] = "2 per hour"
    for n in range(2):
        post(client, "/signup", signup_form(email=f"s{n}@example.org"))
        post(client, "/reset", {"email": f"s{n}@example.org"})
    assert post(client, "/signup", signup_form(email="s9@example.org")).status_code == 429
    assert post(client, "/reset", {"email": "s9@example.org"}).status_code == 429


# ------------------------------------------------- sessions, cookies, headers

def test_login_rotates_the_session_and_cookies_are_httponly_lax(client, local_app):
    make_user("me@example.org")
    with client.session_transaction() as session:
        session["planted"] = "by someone else"
    response = log_in(client, "me@example.org", remember="1")
    cookies = response.headers.getlist("Set-Cookie")
    session_cookie = next(c for c in cookies if c.startswith("session="))
    assert "HttpOnly" in session_cookie and "SameSite=Lax" in session_cookie and "Secure" not in session_cookie
    remember = next(c for c in cookies if c.startswith("remember_token="))
    assert "HttpOnly" in remember
    with client.session_transaction() as session:
        assert "planted" not in session


def test_cookies_are_secure_when_the_setting_says_so(tmp_path):
    from gateway import create_app
    app = create_app({"TESTING": True, "DATA_DIR": str(tmp_path / "d"), "SESSION_COOKIE_SECURE": "true",
                      "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'g.db'}"})
    assert app.config["SESSION_COOKIE_SECURE"] is True and app.config["REMEMBER_COOKIE_SECURE"] is True
    cookie = app.test_client().get("/login").headers.get("Set-Cookie", "")
    assert "Secure" in cookie


def test_pages_carry_a_content_security_policy_and_no_inline_script_or_style(client, admin):
    log_in(client, admin.email)
    for path in ("/login", "/signup", "/", "/upload", "/account", "/admin/users", "/admin/submissions", "/nope"):
        response = client.get(path)
        policy = response.headers["Content-Security-Policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy
        page = response.get_data(as_text=True)
        assert not re.search(r"<script(?![^>]*\bsrc=)", page), path
        assert "<style" not in page and " style=" not in page, path
        assert "://" not in re.sub(r'(href|action)="http[^"]*"', "", page.split("<body", 1)[0]), path


def test_forms_without_a_csrf_token_are_refused(client, local_app):
    make_user("csrf@example.org")
    for path, data in (("/login", {"email": "csrf@example.org", "password": PASSWORD}),
                       ("/signup", signup_form()), ("/reset", {"email": "csrf@example.org"})):
        response = client.post(path, data=data)
        assert response.status_code == 400 and "CSRF" in response.get_data(as_text=True), path
    assert User.query.count() == 1


# ------------------------------------------------------------ passwords

def test_password_reset_link_works_once_and_says_nothing_about_unknown_addresses(client, local_app):
    user = make_user("forgot@example.org")
    known = post(client, "/reset", {"email": "forgot@example.org"})
    unknown = post(client, "/reset", {"email": "nobody@example.org"})
    assert known.status_code == unknown.status_code == 302
    assert AccountEmail.query.filter_by(kind="reset").count() == 1
    _, _, body = sent_account_mail(user, "reset")
    path = "/reset/" + re.search(r"/reset/(\S+)", body).group(1)
    new = "a brand new password"
    assert post(client, path, {"password": new, "confirm": new}).status_code == 302
    assert log_in(client, user.email, new).status_code == 302
    assert client.get(path).status_code == 400  # spent


def test_changing_the_password_ends_other_sessions(client, local_app):
    user = make_user("change@example.org")
    other = client.application.test_client()
    log_in(other, user.email)
    log_in(client, user.email)
    new = "another long password"
    post(client, "/account/password", {"current": PASSWORD, "password": new, "confirm": new}, page="/account")
    fresh()
    assert client.get("/account").status_code == 200  # this session goes on
    fresh()
    assert other.get("/account").status_code == 302  # the other one is over


# --------------------------------------------------------------- tokens

def test_tokens_are_shown_once_listed_with_last_use_and_revocable(client, local_app):
    user = make_user("tok@example.org")
    log_in(client, user.email)
    created = post(client, "/account/tokens", {"name": "laptop"}, page="/account")
    token = re.search(r'id="new-token" class="token">(m2d_[^<]+)<', created.get_data(as_text=True)).group(1)
    assert token not in client.get("/account").get_data(as_text=True)
    headers = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/v1/submissions", headers=headers).status_code == 200
    row = ApiToken.query.filter_by(name="laptop").one()
    assert row.last_used_at is not None and "<td>never</td>" not in client.get("/account").get_data(as_text=True)
    post(client, f"/account/tokens/{row.id}/revoke", {}, page="/account")
    assert client.get("/api/v1/submissions", headers=headers).status_code == 401
    assert post(client, "/account/tokens", {"name": "n" * 101}, page="/account").status_code == 400


# ------------------------------------------------------------- ownership

def test_a_researcher_cannot_see_or_act_on_anothers_things(client, local_app):
    alice, bob = make_user("alice@example.org"), make_user("bob@example.org")
    theirs = lifecycle.create(bob, "bobs.zip")
    token = ApiToken.issue(bob, name="bobs")
    db.session.commit()
    token_id = ApiToken.query.filter_by(name="bobs").one().id
    log_in(client, alice.email)
    for path in (f"/submissions/{theirs.id}", f"/submissions/{theirs.id}/live"):
        assert client.get(path).status_code == 404, path
    for path in (f"/submissions/{theirs.id}/cancel", f"/submissions/{theirs.id}/resubmit",
                 f"/account/tokens/{token_id}/revoke"):
        assert post(client, path, {}, page="/account").status_code == 404, path
    assert "bobs.zip" not in client.get("/").get_data(as_text=True)
    db.session.refresh(theirs)
    assert theirs.status == "received" and db.session.get(ApiToken, token_id).revoked_at is None
    assert token


# --------------------------------------------------------- pages and errors

def test_a_hostile_file_name_shows_as_text(client, local_app):
    user = make_user("xss@example.org")
    submission = lifecycle.create(user, "<img src=x onerror=alert(1)>.zip")
    db.session.commit()
    log_in(client, user.email)
    for path in ("/", f"/submissions/{submission.id}"):
        page = client.get(path).get_data(as_text=True)
        assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;.zip" in page, path


def test_the_detail_page_has_the_timeline_and_polls_while_active(client, local_app):
    user = make_user("live@example.org")
    submission = lifecycle.create(user, "iris.zip")
    db.session.commit()
    log_in(client, user.email)
    page = client.get(f"/submissions/{submission.id}").get_data(as_text=True)
    assert f'data-poll="/submissions/{submission.id}/live"' in page and "Timeline" in page
    live = client.get(f"/submissions/{submission.id}/live").json
    assert live["status"] == "received" and live["terminal"] is False and "badge-received" in live["html"]
    lifecycle.cancel(submission)
    assert client.get(f"/submissions/{submission.id}/live").json["terminal"] is True
    assert "data-poll" not in client.get(f"/submissions/{submission.id}").get_data(as_text=True)


def test_an_empty_list_says_to_try_the_iris_sample_and_lists_paginate(client, local_app):
    user = make_user("new@example.org")
    log_in(client, user.email)
    assert "Try the iris sample first" in client.get("/").get_data(as_text=True)
    for n in range(25):
        lifecycle.create(user, f"s{n}.zip")
    db.session.commit()
    first = client.get("/").get_data(as_text=True)
    older = re.search(r'href="([^"]+)" rel="next"', first).group(1).replace("&amp;", "&")
    second = client.get(older).get_data(as_text=True)
    assert "s24.zip" in first and "s0.zip" not in first and "s0.zip" in second
    assert 'rel="prev"' in second and 'rel="next"' not in second
    newer = re.search(r'href="([^"]+)" rel="prev"', second).group(1).replace("&amp;", "&")
    assert "s24.zip" in client.get(newer).get_data(as_text=True)
    assert client.get("/?before=nope").status_code == 400


def test_error_pages_are_in_the_site_layout_and_json_under_api(client, local_app):
    @local_app.get("/boom")
    def boom():
        raise RuntimeError("kaput")
    missing = client.get("/no/such/page")
    assert missing.status_code == 404 and 'href="/static/site.css"' in missing.get_data(as_text=True)
    assert client.get("/api/v1/nothing").json["error"] == "not_found"
    local_app.config["PROPAGATE_EXCEPTIONS"] = False
    failed = client.get("/boom")
    page = failed.get_data(as_text=True)
    assert failed.status_code == 500 and "Something went wrong on our side" in page and "kaput" not in page
    assert 'href="/static/site.css"' in page


def test_an_account_email_is_sent_once_however_often_it_is_asked(local_app):
    user = make_user("once@example.org", approved=False)
    row = accounts.owe_email(user, "verify", f"verify-{user.id}")
    assert accounts.owe_email(user, "verify", f"verify-{user.id}") is None  # the same key: not owed twice
    mailer = FakeMailer()
    assert mail.send_account(row.id, mailer) is True
    assert mail.send_account(row.id, mailer) is False
    assert len(mailer.sent) == 1
