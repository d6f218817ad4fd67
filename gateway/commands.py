"""Admin commands: ``flask --app gateway status|users|tokens|weights|releases|disclosure|provenance|airlock|images|slurm ...``."""
from pathlib import Path

import click
from flask import current_app
from flask.cli import AppGroup

from . import queue
from .adapters.mlflow import MlflowError
from .adapters.slurm import SlurmError
from .core import accounts, airlock, disclosure, images, overview, provenance, scheduling, usage, weights
from .core.models import ApiToken, ReleaseRequest, Submission, User
from .extensions import db

users = AppGroup("users", help="Manage researcher and admin accounts.")
tokens = AppGroup("tokens", help="Manage API tokens.")
weights_group = AppGroup("weights", help="Manage the model cache jobs read pretrained weights from.")


@users.command("create")
@click.argument("email")
@click.option("--name", required=True, help="Full name.")
@click.option("--password", help="Web login password (12+ characters); omit for API-only users.")
@click.option("--admin", is_flag=True, help="Make the user an admin.")
@click.option("--approve", is_flag=True, help="Approve at once (provisions MLflow).")
@click.option("--reviewer", is_flag=True, help="May approve or reject the release of exported files.")
def create_user(email, name, password, admin, approve, reviewer):
    """Create a user."""
    try:
        user = accounts.create_user(email, name, password, is_admin=admin)
    except accounts.AccountError as e:
        raise click.ClickException(str(e))
    if reviewer:
        user.is_reviewer = True
        db.session.commit()
    if approve:
        try:
            accounts.approve(user)
        except (MlflowError, SlurmError) as e:
            service = "MLflow" if isinstance(e, MlflowError) else "Slurm's accounting (sacctmgr)"
            raise click.ClickException(f"created {user.email}, but approval failed: {e}. "
                                       f"Run 'users approve {user.email}' once {service} answers.")
    click.echo(f"created {user.email} (id {user.id}){' approved' if user.approved else ''}")


@users.command("approve")
@click.argument("email")
def approve_user(email):
    """Approve a user and provision their MLflow account."""
    try:
        user = accounts.approve(accounts.find(email))
    except (accounts.AccountError, MlflowError, SlurmError) as e:
        raise click.ClickException(str(e))
    slurm = accounts.slurm_account(user)
    click.echo(f"approved {user.email}; MLflow user and experiment: {user.mlflow_username}"
               + (f"; Slurm account {slurm}" if slurm else ""))


@users.command("grant-reviewer")
@click.argument("email")
@click.option("--revoke", is_flag=True, help="Take the role away instead.")
def grant_reviewer(email, revoke):
    """Let EMAIL review release requests (or no longer, with --revoke)."""
    try:
        user = accounts.find(email)
    except accounts.AccountError as e:
        raise click.ClickException(str(e))
    user.is_reviewer = not revoke
    db.session.commit()
    click.echo(f"{user.email} {'is no longer' if revoke else 'is'} a reviewer")


@users.command("dry-run")
@click.argument("email")
@click.option("--skip/--require", default=False,
              help="--skip: EMAIL's submissions go to the real data without a dry run first; "
                   "--require (the default): they run on the synthetic twin first.")
def dry_run_user(email, skip):
    """Whether EMAIL's submissions run a dry run on the synthetic twin first
    (all do while M2D_DRY_RUN is on, unless skipped here)."""
    try:
        user = accounts.find(email)
    except accounts.AccountError as e:
        raise click.ClickException(str(e))
    user.skip_dry_run = skip
    db.session.commit()
    click.echo(f"{user.email}: {'no dry run' if skip else 'dry run first'}"
               f"{'' if current_app.config['DRY_RUN'] else ' (dry runs are off for everyone: M2D_DRY_RUN)'}")


@users.command("disable")
@click.argument("email")
def disable_user(email):
    """Disable EMAIL: no login, no submission; their Slurm account runs and
    queues nothing more (history kept) and what they have waiting is cancelled."""
    try:
        user = accounts.find(email)
    except accounts.AccountError as e:
        raise click.ClickException(str(e))
    cancelled = accounts.disable(user)
    click.echo(f"{user.email} is disabled; {cancelled} submission(s) are being cancelled")


@users.command("enable")
@click.argument("email")
def enable_user(email):
    """Enable EMAIL again (their Slurm account gets the configured limits)."""
    try:
        accounts.enable(accounts.find(email))
    except (accounts.AccountError, SlurmError) as e:
        raise click.ClickException(str(e))
    click.echo(f"{email} is enabled")


@users.command("list")
def list_users():
    """List users."""
    for user in User.query.order_by(User.id):
        state = "approved" if user.approved else "waiting"
        click.echo(f"{user.id}\t{user.email}\t{user.name}\t{state}\t"
                   f"{'admin' if user.is_admin else ''}\t{user.mlflow_username or ''}")


@tokens.command("create")
@click.argument("email")
def create_token(email):
    """Create an API token for EMAIL; the token is the last line printed."""
    try:
        user = accounts.find(email)
    except accounts.AccountError as e:
        raise click.ClickException(str(e))
    token = ApiToken.issue(user)
    db.session.commit()
    click.echo(f"API token for {user.email} (shown once, keep it secret):")
    click.echo(token)


@weights_group.command("add")
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--as", "name", required=True,
              help="Path in the cache, e.g. torch/hub/checkpoints/resnet18-f37072fd.pth")
def add_weights(source, name):
    """Copy SOURCE into the model cache (jobs see it read-only)."""
    try:
        target = weights.add(current_app.config, source, name)
    except weights.WeightsError as e:
        raise click.ClickException(str(e))
    click.echo(f"added {target} (jobs: /opt/m2d/models/{name})")


@weights_group.command("list")
def list_weights():
    """List the files in the model cache."""
    for name, size in weights.listing(current_app.config):
        click.echo(f"{size:>12}  {name}")


releases = AppGroup("releases", help="Review requests to release exported files (the airlock).")
provenance_group = AppGroup("provenance", help="Submissions' hash-chained provenance records.")
airlock_group = AppGroup("airlock", help="Export retention and released files' expiry.")
images_group = AppGroup("images", help="Environment images built for submissions.")


def _request_line(request):
    files = ", ".join(f"{i.file.path} ({i.status})" for i in request.items)
    return (f"{request.id}\tsubmission {request.submission_id}\t{request.status}\t"
            f"{request.requester.email}\t{request.created_at:%Y-%m-%d %H:%M}\t{files}")


@releases.command("list")
@click.option("--all", "show_all", is_flag=True, help="Also the decided ones.")
def list_releases(show_all):
    """List pending release requests (id, submission, status, requester, files)."""
    rows = (ReleaseRequest.query.order_by(ReleaseRequest.id).all() if show_all
            else airlock.pending_requests())
    for request in rows:
        click.echo(_request_line(request))
        click.echo(f"\tjustification: {request.justification}")
    if not rows:
        click.echo("no pending release requests")


def _decide(request_id, reviewer, decision, comment, paths):
    try:
        request = airlock.decide(airlock.get_request(request_id), accounts.find(reviewer), decision,
                                 comment or "", list(paths) or None)
    except (airlock.AirlockError, accounts.AccountError) as e:
        raise click.ClickException(str(e))
    click.echo(_request_line(request))


@releases.command("approve")
@click.argument("request_id", type=int)
@click.option("--reviewer", required=True, help="The reviewer's email (not the requester's).")
@click.option("--comment", default="", help="What the researcher reads.")
@click.option("--path", "paths", multiple=True, help="Only this file of the request (repeatable).")
def approve_release(request_id, reviewer, comment, paths):
    """Approve the files of release request ID (all pending ones, or --path)."""
    _decide(request_id, reviewer, "approve", comment, paths)


@releases.command("reject")
@click.argument("request_id", type=int)
@click.option("--reviewer", required=True, help="The reviewer's email.")
@click.option("--comment", required=True, help="Why: the researcher reads it.")
@click.option("--path", "paths", multiple=True, help="Only this file of the request (repeatable).")
def reject_release(request_id, reviewer, comment, paths):
    """Reject the files of release request ID (all pending ones, or --path)."""
    _decide(request_id, reviewer, "reject", comment, paths)


@releases.command("override")
@click.argument("request_id", type=int)
@click.option("--reviewer", required=True, help="The reviewer's email.")
@click.option("--comment", required=True, help="Why the file may leave although its disclosure report fails it.")
@click.option("--path", "paths", multiple=True, help="Only this file of the request (repeatable).")
def override_release(request_id, reviewer, comment, paths):
    """Override the disclosure report's fail on files of release request ID (DISCLOSURE_OVERRIDES reviewers must)."""
    _decide(request_id, reviewer, disclosure.OVERRIDE, comment, paths)


disclosure_group = AppGroup("disclosure", help="Disclosure reports of exports (sealed report jobs).")


@disclosure_group.command("show")
@click.argument("submission_id", type=int)
def show_disclosure(submission_id):
    """Each export file's status and checks."""
    submission = db.session.get(Submission, submission_id)
    if submission is None:
        raise click.ClickException(f"there is no submission {submission_id}")
    view = disclosure.reviewer_view(submission)
    click.echo(f"report {view['status']}{': ' + view['error'] if view['error'] else ''}; {view['summary']}")
    for f in view["files"]:
        click.echo(f"{f['status']}\t{f['path']}")
        for check in f["checks"]:
            click.echo(f"\t{check['name']}: {check['status']}: {check['reason']}")


@disclosure_group.command("rerun")
@click.argument("submission_id", type=int)
def rerun_disclosure(submission_id):
    """Run the submission's report job again (after a failed one, or a changed checker)."""
    submission = db.session.get(Submission, submission_id)
    if submission is None or not submission.state.terminal:
        raise click.ClickException(f"submission {submission_id} does not exist or has not ended")
    disclosure.again(submission_id)
    db.session.commit()
    queue.enqueue_disclosure(submission_id)
    click.echo(f"submission {submission_id}: disclosure report owed again; the report job is queued")


@provenance_group.command("verify")
@click.argument("submission_id", type=int, required=False)
def verify_provenance(submission_id):
    """Check the hash chain of one submission (or all); exit 1 at the first broken link."""
    ids = [submission_id] if submission_id else provenance.submissions_with_records()
    for checked in ids:
        broken = provenance.verify(checked)
        if broken:
            raise click.ClickException(f"broken: {broken}")
    click.echo(f"ok: {len(ids)} chain(s) verified")


@airlock_group.command("purge")
@click.option("--now", "now", type=click.DateTime(), help="Pretend it is this UTC time (tests, drills).")
def purge_exports(now):
    """Warn about, then delete, exports past retention; delete expired released files."""
    done = airlock.purge(now)
    click.echo(" ".join(f"{key}={value}" for key, value in done.items()))


@images_group.command("gc")
@click.option("--dry-run", is_flag=True, help="List what would be deleted; delete nothing.")
@click.option("--days", type=float, help="Unused for this many days (default: IMAGE_GC_DAYS).")
def collect_images(dry_run, days):
    """Delete environment images unused for IMAGE_GC_DAYS and not in use by an active submission."""
    done = images.collect(dry_run=dry_run, days=days)
    for name in done.pop("images"):
        click.echo(name)
    click.echo(" ".join(f"{key}={value}" for key, value in done.items()))


@click.command("status")
def status():
    """One screen: submissions per state, each active job next to what Slurm
    says (disagreements marked !), workers alive, queue depths."""
    click.echo(overview.render(overview.gather(current_app.config)), nl=False)


slurm_group = AppGroup("slurm", help="Researchers' Slurm accounts: fair share, limits, usage.")


@slurm_group.command("usage")
def slurm_usage():
    """Every researcher's account, fair-share factor and usage this period (sshare, sreport)."""
    found = usage.overview()
    if found["error"]:
        raise click.ClickException(f"Slurm did not answer: {found['error']}")
    click.echo(f"since {found['period_start']:%Y-%m-%d} (UTC); limits: " + " ".join(
        f"{key}={value if value else '-'}" for key, value in found["limits"].items()))
    click.echo("account\tuser\tfair_share\tcpu_min\tgpu_min\tgpu_limit\tsreport_cpu_min\tsreport_gpu_min")
    for row in found["rows"]:
        share = row["share"] or {}
        fair_share = share.get("fair_share")
        click.echo("\t".join(str(v) for v in (
            row["account"], row["user"].email, "-" if fair_share is None else f"{fair_share:.3f}",
            share.get("cpu_minutes_used", "-"), share.get("gpu_minutes_used", "-"),
            share.get("gpu_minutes_limit") or "-", row["report"].get("cpu", 0), row["report"].get("gres/gpu", 0))))


@slurm_group.command("sync")
def slurm_sync():
    """Give every approved researcher their Slurm account (made if missing) with
    the configured limits (disabled ones stay disabled); after changing M2D_SLURM_* limits."""

    slurm = scheduling.accounts()
    for user in User.query.filter(User.approved_at.isnot(None)).order_by(User.id):
        try:
            name = accounts.slurm_account(user)
            if name is None:
                raise click.ClickException("M2D_SLURM_ACCOUNTS is off: the gateway makes no Slurm accounts")
            if user.disabled_at:
                slurm.disable(name)
            else:
                slurm.set_limits(name)
        except SlurmError as e:
            raise click.ClickException(f"{user.email}: {e}")
        click.echo(f"{name}\t{user.email}\t{'disabled' if user.disabled_at else 'limits set'}")


def init_app(app):
    app.cli.add_command(status)
    app.cli.add_command(slurm_group)
    app.cli.add_command(releases)
    app.cli.add_command(disclosure_group)
    app.cli.add_command(provenance_group)
    app.cli.add_command(airlock_group)
    app.cli.add_command(images_group)
    app.cli.add_command(users)
    app.cli.add_command(tokens)
    app.cli.add_command(weights_group)
