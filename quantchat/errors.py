"""Errors that quantchat reports to the user as one clear line (no traceback)."""


class QuantchatError(Exception):
    """A user-facing error: bad path, corrupt file, unsupported model, prompt too long..."""


class ModelLoadError(QuantchatError):
    """The model could not be found, read or understood."""


class ContextLengthError(QuantchatError):
    """A prompt (plus the tokens to generate) does not fit the context window."""
