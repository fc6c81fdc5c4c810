"""The one error type for mistakes a user can fix (bad params, missing inputs)."""

# EX_TEMPFAIL: a failure worth another try (a tracking server that did not answer); the flow
# retries only these
EXIT_TRANSIENT = 75


class Terminated(BaseException):  # noqa: N818 - a stop, as KeyboardInterrupt is, not an error
    """SIGTERM or SIGHUP reached a command: raised where it was, so that what it holds unwinds
    (its MLflow run ends KILLED, its lock and temporary files go); exit code 128 + the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class BigModelError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits with code 2."""


class TransientError(BigModelError):
    """A failure worth retrying (a tracking server that did not answer, say): exit code 75."""


class DiskFull(BigModelError):
    """The filesystem refused a write (no space left, or a file-size limit): exit code 74."""


# How a tracking server that is down or unreachable shows itself, whichever layer raised it
# (requests, urllib3, http.client or MLflow wrapping one of them).
UNREACHABLE_TYPES = {"ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout", "MaxRetryError",
                     "NewConnectionError", "RemoteDisconnected", "ConnectionRefusedError",
                     "ConnectionResetError", "ProtocolError"}
UNREACHABLE_TEXT = ("Max retries exceeded", "Connection refused", "Failed to establish a new "
                    "connection", "Connection aborted", "Read timed out", "RemoteDisconnected",
                    "too many 5", "Connection reset")


def unreachable(e: BaseException | None) -> bool:
    """Whether `e`, or an error it was raised from or while handling, says a server could not
    be reached (a transient failure: worth retrying), rather than that a request was wrong."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if type(e).__name__ in UNREACHABLE_TYPES or any(t in str(e) for t in UNREACHABLE_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False
