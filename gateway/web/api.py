"""The JSON API, /api/v1: what the m2d client and scripts use."""
from flask import Blueprint, abort, current_app, g, jsonify, request, send_file, url_for

from m2d.contract import __version__
from m2d.contract.states import IllegalTransition
from m2d.contract.validation import Refusal

from ..core import airlock, intake, lifecycle, provenance, usage
from ..core.models import Submission
from ..extensions import csrf, db
from . import pagination
from .auth import token_required
from .errors import json_error as error

bp = Blueprint("api", __name__, url_prefix="/api/v1")
csrf.exempt(bp)

REFUSAL_STATUS = {"too_large": 413, "quota_exceeded": 429}
API_PAGE = 100  # submissions per page of the list, at most


@bp.after_request
def say_version(response):
    # the version of the client this gateway serves (/client): an m2d of another version warns
    response.headers["M2D-Version"] = __version__
    return response


@bp.post("/submissions")
@token_required
def create_submission():
    try:
        submission = intake.accept(g.user, request.files.get("file"))
    except Refusal as refusal:
        return error(REFUSAL_STATUS.get(refusal.code, 400), refusal.code, refusal.message)
    response = jsonify(submission.to_dict())
    response.status_code = 201
    response.headers["Location"] = f"/api/v1/submissions/{submission.id}"
    return response


@bp.get("/submissions")
@token_required
def list_submissions():
    """Newest first, ``limit`` (1-100, default 100) at a time; ``next`` is the
    URL of the older page, null on the last one."""
    raw = request.args.get("limit", str(API_PAGE))
    if not raw.isdigit() or not 1 <= int(raw) <= API_PAGE:
        abort(400, description=f"limit must be a whole number from 1 to {API_PAGE}, not {raw[:20]!r}.")
    page = pagination.page_from_request(db.select(Submission).filter_by(user_id=g.user.id), Submission.id, int(raw))
    older = url_for("api.list_submissions", before=page.older, limit=raw) if page.older else None
    return jsonify(submissions=[s.to_dict() for s in page.items], next=older)


@bp.get("/submissions/<int:submission_id>")
@token_required
def get_submission(submission_id):
    return jsonify(_own(submission_id).to_dict())


@bp.post("/submissions/<int:submission_id>/cancel")
@token_required
def cancel_submission(submission_id):
    submission = _own(submission_id)
    try:
        lifecycle.cancel(submission)
    except IllegalTransition as e:
        return error(409, "already_ended", f"{e}; there is nothing to cancel.")
    db.session.refresh(submission)
    response = jsonify(submission.to_dict())
    response.status_code = 202
    return response


@bp.get("/submissions/<int:submission_id>/export")
@token_required
def export(submission_id):
    return jsonify(airlock.overview(_own(submission_id)))


@bp.post("/submissions/<int:submission_id>/release-requests")
@token_required
def request_release(submission_id):
    submission = _own(submission_id)
    body = request.get_json(silent=True) or {}
    try:
        release = airlock.request_release(g.user, submission, body.get("paths"), body.get("justification", ""))
    except airlock.AirlockError as e:
        return error(e.status, e.code, e.message)
    response = jsonify(airlock.owner_view(release))
    response.status_code = 201
    return response


@bp.get("/submissions/<int:submission_id>/export/<path:path>")
@token_required
def download(submission_id, path):
    return download_response(g.user, _own(submission_id), path, error)


@bp.get("/submissions/<int:submission_id>/provenance")
@token_required
def get_provenance(submission_id):
    submission = _own(submission_id)
    broken = provenance.verify(submission.id)
    disclosed = airlock.ever_released(submission.id)
    return jsonify(submission_id=submission.id, verified=broken is None,
                   broken=str(broken) if broken else None,
                   records=[provenance.owner_view(r, disclosed) for r in provenance.chain(submission.id)])


def download_response(user, submission, path, on_error):
    """A released file, streamed and resumable (ranges), as an attachment."""
    try:
        copy, _item = airlock.download(user, submission, path, request.remote_addr,
                                       request.headers.get("Range"))
    except airlock.AirlockError as e:
        return on_error(e.status, e.code, e.message)
    return send_file(copy, as_attachment=True, download_name=path.rsplit("/", 1)[-1],
                     mimetype="application/octet-stream", conditional=True, max_age=0)


@bp.get("/me")
@token_required
def me():
    user = g.user
    return jsonify(
        email=user.email,
        name=user.name,
        mlflow=mlflow_settings(user),
    )


@bp.get("/usage")
@token_required
def get_usage():
    """The caller's Slurm account: usage this period against their limits."""
    return jsonify(usage.for_user(g.user))


def _own(submission_id):
    return Submission.of(g.user, submission_id) or abort(404, f"You have no submission {submission_id}.")


def mlflow_settings(user):
    return {
        "username": user.mlflow_username,
        "password": user.mlflow_password,
        "tracking_uri": current_app.config["MLFLOW_PUBLIC_URL"],
        "experiment_name": user.mlflow_username,
    }

