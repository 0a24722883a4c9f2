"""``sa-lens`` command line; each stage's options live in its own module under ``sa_lens/commands/``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sa_lens.commands import edit, evaluate, export_vector, lab, safety_vector, trace, vectors
from sa_lens.errors import SaLensError

__all__ = ["main"]

# Order is the order of `sa-lens --help`: the main job first, then the stages alone.
_COMMANDS = (lab, evaluate, vectors, safety_vector, export_vector, edit, trace)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sa-lens`` console script; returns 0 on success and 2 on bad input.

    Bad input (a missing file, a vector for another model, a malformed data set: a :class:`SaLensError` or a
    missing file) is reported on stderr as ``sa-lens <command>: <what is wrong and the fix>``. Any other
    exception is a bug and keeps its traceback.
    """
    parser = argparse.ArgumentParser(prog="sa-lens", description="Safety Arithmetic on TransformerLens.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in _COMMANDS:
        command.register(sub)
    args = parser.parse_args(argv)
    try:
        return args.run(args, parser)
    except (SaLensError, FileNotFoundError) as e:
        print(f"sa-lens {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
