"""The ``ditperf`` command line: one entry point, one subcommand group per area.

Each area module exposes ``register(subparsers)``; it must import only the standard
library at module level so that ``ditperf --help`` stays fast. Heavy imports (torch,
composer, onnx) happen inside the handlers.
"""

from ditperf.cli.errors import UserError

__all__ = ["UserError"]
