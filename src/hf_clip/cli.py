"""`hf-clip`: convert checkpoints, evaluate, write model cards and publish to the Hub."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from .cards import add_card_parser
    from .convert.cli import add_convert_parser
    from .evaluation.bias_cli import add_bias_parser
    from .evaluation.cli import add_eval_parser
    from .hub import add_push_parser

    parser = argparse.ArgumentParser(prog="hf-clip", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_convert_parser(commands)
    add_bias_parser(add_eval_parser(commands))
    add_card_parser(commands)
    add_push_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import os
    import sys

    from .evaluation.cli import run_eval

    args = build_parser().parse_args(argv)
    try:
        result = (getattr(args, "func", None) or run_eval)(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        # Bad input (a missing column, an unknown split, a wrong path): the message names the problem and
        # the fix, so a command-line user gets it in one line; HF_CLIP_TRACEBACK=1 shows where it came from.
        if os.environ.get("HF_CLIP_TRACEBACK"):
            raise
        print(f"hf-clip {args.command}: error: {error}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
