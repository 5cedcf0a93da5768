"""One base error for the service packages; each package derives its own from it."""


class SomnaError(Exception):
    """A domain error: the CLI prints it as one line and exits 1."""


class SetupError(SomnaError):
    """Something the machine lacks or a setting that cannot work; the message names the fix."""


class Backpressure(SomnaError):
    """A downstream is full; try again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after
