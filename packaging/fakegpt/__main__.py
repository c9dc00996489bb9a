"""``python -m fakegpt`` for the installed package (in the repository, fakegpt.py runs itself)."""

from fakegpt import command

raise SystemExit(command())
