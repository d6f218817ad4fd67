"""Model-to-Data Gateway: the web app and API.

``create_app`` is imported lazily so that a module of the package (a command, a
worker's task) can be imported without building the whole app.
"""


def create_app(config=None):
    from .app import create_app as _create_app
    return _create_app(config)
