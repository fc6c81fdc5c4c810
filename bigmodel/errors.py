"""The one error type for mistakes a user can fix (bad params, missing inputs)."""


class BigModelError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits with code 2."""


class TransientError(BigModelError):
    """A failure worth retrying (a tracking server that did not answer, say): exit code 75."""


class DiskFull(BigModelError):
    """The filesystem refused a write (no space left, or a file-size limit): exit code 74."""
