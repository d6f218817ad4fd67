"""Admin commands: ``flask --app gateway users|tokens|weights ...``."""
from pathlib import Path

import click
from flask import current_app
from flask.cli import AppGroup

from . import accounts, weights
from .adapters.mlflow import MlflowError
from .extensions import db
from .models import ApiToken, User

users = AppGroup("users", help="Manage researcher and admin accounts.")
tokens = AppGroup("tokens", help="Manage API tokens.")
weights_group = AppGroup("weights", help="Manage the model cache jobs read pretrained weights from.")


@users.command("create")
@click.argument("email")
@click.option("--name", required=True, help="Full name.")
@click.option("--password", help="Web login password (12+ characters); omit for API-only users.")
@click.option("--admin", is_flag=True, help="Make the user an admin.")
@click.option("--approve", is_flag=True, help="Approve at once (provisions MLflow).")
def create_user(email, name, password, admin, approve):
    """Create a user."""
    try:
        user = accounts.create_user(email, name, password, is_admin=admin)
    except accounts.AccountError as e:
        raise click.ClickException(str(e))
    if approve:
        try:
            accounts.approve(user)
        except MlflowError as e:
            raise click.ClickException(f"created {user.email}, but approval failed: {e}. "
                                       f"Run 'users approve {user.email}' once MLflow answers.")
    click.echo(f"created {user.email} (id {user.id}){' approved' if user.approved else ''}")


@users.command("approve")
@click.argument("email")
def approve_user(email):
    """Approve a user and provision their MLflow account."""
    try:
        user = accounts.approve(accounts.find(email))
    except (accounts.AccountError, MlflowError) as e:
        raise click.ClickException(str(e))
    click.echo(f"approved {user.email}; MLflow user and experiment: {user.mlflow_username}")


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


def init_app(app):
    app.cli.add_command(users)
    app.cli.add_command(tokens)
    app.cli.add_command(weights_group)
