"""m2d's errors: each carries a message that says what to fix, shown without a traceback.

Stdlib only, so the command line can name them before it imports the client
(requests) or the local runner."""


class LocalRunError(Exception):
    """`m2d run` could not run the submission locally."""


class ApiError(Exception):
    """`code` is the gateway's error slug (or one of ours: no_connection, timeout,
    bad_response); `status` the HTTP status, None when there was no answer."""

    def __init__(self, code: str, message: str, status: int | None = None):
        super().__init__(message)
        self.code, self.message, self.status = code, message, status
