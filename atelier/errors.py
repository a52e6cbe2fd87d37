"""The one error type the CLI turns into a single line and exit code 2."""

from __future__ import annotations


class BriefError(Exception):
    """Bad user input: names the file and the field (``file: field: message``)."""

    def __init__(self, file: str, field: str, message: str) -> None:
        self.file, self.field, self.message = file, field, message
        super().__init__(f"{file}: {field}: {message}" if field else f"{file}: {message}")


class UsageError(Exception):
    """Bad command-line input that is not about a brief (unknown run id, missing file...)."""


class StoreError(UsageError):
    """A lineage store or asset location that cannot be opened; ``option`` is the one that named it."""

    def __init__(self, option: str, message: str) -> None:
        self.option, self.message = option, message
        super().__init__(f"{option}: {message}")
