"""Must fail mypy --strict with one error: proof that mypy sees fakegpt's types."""

import fakegpt

version: int = fakegpt.__version__
