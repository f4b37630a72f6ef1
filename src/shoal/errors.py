"""The one error hierarchy: narrow, typed, caught in known places (api/errors.py, cli.py)."""


class ShoalError(Exception):
    """Base of every error shoal raises on purpose."""


class BadRequest(ShoalError):
    """The caller asked for something malformed or impossible (HTTP 400, CLI exit 1)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ModelNotFound(ShoalError):
    """No card, file or directory answers to this model id (HTTP 404)."""


class ModelUnavailable(ShoalError):
    """The model is known but cannot be loaded or run here now (HTTP 503)."""


class ContextOverflow(BadRequest):
    """The prompt (plus the requested output) does not fit the model's context (HTTP 400)."""


class UnsupportedModel(ShoalError):
    """The weights use an architecture or tensor type no engine here implements."""


class Overloaded(ShoalError):
    """Too many requests are queued for the model now; retry later (HTTP 429, Retry-After)."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
