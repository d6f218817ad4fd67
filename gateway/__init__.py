"""Model-to-Data Gateway: the web app and API.

``create_app`` is imported lazily so that a module of the package (a command, a
worker's task) can be imported without building the whole app.
"""


def create_app(config=None):
    import click

    from .app import create_app as _create_app
    from .config import ConfigError
    try:
        return _create_app(config)
    except ConfigError as error:
        if click.get_current_context(silent=True) is None:
            raise
        # under `flask --app gateway ...`: click prints "Error: <what to set>", not a traceback
        raise click.ClickException(str(error)) from None
