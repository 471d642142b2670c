"""One exception type for everything a user can cause, carrying the process exit code."""

from __future__ import annotations

# Exit codes of the command-line tool (documented in README.md).
EXIT_OK = 0
EXIT_OUTLIERS = 1  # `scan --fail-on-outliers` found flagged channels
EXIT_BAD_INPUT = 2  # usage error, missing/corrupt/hostile file
EXIT_NOTHING = 3  # no scored layer: nothing can be sanitized
EXIT_INTERNAL = 4  # a bug in onnxclp (traceback with --debug)
EXIT_REFUSED = 5  # sanitize: the guard cannot show the result within --max-acc-drop (at --confidence; nothing written)
EXIT_UNVERIFIED = 6  # `scan --fail-on suspicious`: a model no detector could examine (unless --allow-unverified)


class OnnxclpError(Exception):
    """An error with a one-line message for the user and the exit code to leave with."""

    def __init__(self, message: str, exit_code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class NothingToSanitize(OnnxclpError):
    """The model has no layer that can be scored."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_NOTHING)
