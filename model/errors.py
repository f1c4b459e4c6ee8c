"""Errors a user can cause and fix: the command line prints them as one line, the service as a status."""


class CineSRError(Exception):
    """Base for problems with the user's input or configuration (not bugs)."""


class InputError(CineSRError):
    """Input files that cannot be used: unreadable, not DICOM, not cine, inconsistent."""

    def __init__(self, reason: str, path: object | None = None) -> None:
        self.reason = reason
        self.path = path
        super().__init__(f"{path}: {reason}" if path is not None else reason)
