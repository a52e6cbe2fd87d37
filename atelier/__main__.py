"""``python -m atelier`` == the ``atelier`` command."""

from atelier.cli import main

main()
