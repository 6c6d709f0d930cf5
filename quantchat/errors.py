"""Errors that quantchat reports to the user as one clear line (no traceback)."""


class QuantchatError(Exception):
    """A user-facing error: bad path, corrupt file, unsupported model, prompt too long..."""


class ModelLoadError(QuantchatError):
    """The model could not be found, read or understood."""


class ContextLengthError(QuantchatError):
    """A prompt (plus the tokens to generate) does not fit the context window."""


class BadRequestError(QuantchatError):
    """A request that cannot be run as asked (malformed, out of range): HTTP 400."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class UnknownModelError(QuantchatError):
    """A request names a model no worker serves: HTTP 404."""


class QueueFullError(QuantchatError):
    """The waiting queue is at its limit; retry later: HTTP 429."""


class UnavailableError(QuantchatError):
    """Nothing can serve the request right now (loading, no worker alive): HTTP 503."""
