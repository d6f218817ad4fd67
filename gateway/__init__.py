"""Model-to-Data Gateway: the web app and API.

``create_app`` is imported lazily so that ``gateway.validation`` (the rules of a
valid submission, shared with the researcher's client) imports without Flask.
"""


def create_app(config=None):
    from .app import create_app as _create_app
    return _create_app(config)
