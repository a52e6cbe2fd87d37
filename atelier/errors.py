"""The one error type the CLI turns into a single line and exit code 2."""

from __future__ import annotations

import unicodedata

_ESCAPED = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}  # control, format, surrogate, unassigned, line/paragraph breaks


def one_line(text: str) -> str:
    """``text`` with line breaks and other control characters escaped (``\\n``): an error is one line, whatever
    a key or file name in it holds."""
    return "".join(c if unicodedata.category(c) not in _ESCAPED else ascii(c)[1:-1] for c in text)


class BriefError(Exception):
    """Bad user input: names the file and the field (``file: field: message``), always on one line."""

    def __init__(self, file: str, field: str, message: str) -> None:
        self.file, self.field, self.message = one_line(file), one_line(field), one_line(message)
        super().__init__(f"{self.file}: {self.field}: {self.message}" if field else f"{self.file}: {self.message}")


class UsageError(Exception):
    """Bad command-line input that is not about a brief (unknown run id, missing file...)."""


class StoreError(UsageError):
    """A lineage store or asset location that cannot be opened; ``option`` is the one that named it."""

    def __init__(self, option: str, message: str) -> None:
        self.option, self.message = option, message
        super().__init__(f"{option}: {message}")
