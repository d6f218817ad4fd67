"""The error of `m2d run`: a message that says what to fix, shown without a traceback."""


class LocalRunError(Exception):
    pass
