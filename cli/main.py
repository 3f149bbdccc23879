"""``ditperf`` entry point."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ditperf.cli.errors import UserError

# Area modules that add subcommands. Each defines ``register(subparsers)`` and keeps its
# module-level imports light; handlers are set with ``set_defaults(func=...)`` and return
# an exit code.
AREA_MODULES = (
    "ditperf.cli.version",
    "ditperf.cli.demo",
    "ditperf.trainer.cli",
    "ditperf.profiling.cli",
    "ditperf.export.cli",
)

DESCRIPTION = """\
ditperf: Triton kernels, a latent Diffusion Transformer, Composer training on Streaming
shards, ONNX/TensorRT export and NVML power profiling, for performance engineers.

Start with `ditperf demo` (runs everything small on CPU, bigger on a GPU), or
`ditperf <command> --help` for one area."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ditperf", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in AREA_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # area not built yet: leave its commands out
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"ditperf {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("ditperf: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
