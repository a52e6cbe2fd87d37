"""The ``atelier`` command line: thin Typer commands, one module per command group.

Every user error (bad brief, unknown run, unknown profile) ends as one line on stderr and exit 2.
"""

from __future__ import annotations

import sys

from atelier.cli import assets, doctor, inspect, models, review, run, schedule, server  # noqa: F401  (registers the commands)
from atelier.cli.common import app, err
from atelier.errors import BriefError, UsageError

__all__ = ["app", "main"]


def main() -> None:
    try:
        app()
    except (BriefError, UsageError) as exc:
        from rich.markup import escape

        err.print(f"error: {escape(str(exc))}", highlight=False, soft_wrap=True, emoji=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
