"""Error types a user can act on. The CLI prints their message as one line and exits 2;
the Python API raises them as they are."""


class HeteroError(Exception):
    """Base of every error hetero reports to a user."""


class ModelFormatError(HeteroError):
    """A model directory or file is missing, truncated or malformed."""


class UnsupportedModelError(HeteroError):
    """The checkpoint is well-formed but describes something hetero does not run."""


class PromptTooLongError(HeteroError):
    """The prompt does not fit the model's context window."""


class InvalidRequestError(HeteroError):
    """A generation parameter is out of range."""


class CapacityError(HeteroError):
    """A request cannot run now for want of a resource (an accelerator's memory), though the
    request itself is valid: the server answers 503 and serves the others."""
