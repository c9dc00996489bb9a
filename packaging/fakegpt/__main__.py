"""``python -m fakegpt`` for the installed package (in the repository, fakegpt.py runs itself)."""

from fakegpt import main

raise SystemExit(main())
