"""`hf-clip`: convert checkpoints, evaluate, write model cards and publish to the Hub."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .hub import HubUploadError


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


# Bad input (a missing column, an unknown split, a wrong path, a checkpoint that does not convert): the
# messages name the problem and the fix, so a command-line user gets them in one line.
USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    HubUploadError,
)


def report_error(command: str, error: Exception) -> int:
    """Print `error` as one line and return the exit code 2; HF_CLIP_TRACEBACK=1 re-raises it instead."""
    import os
    import sys

    if os.environ.get("HF_CLIP_TRACEBACK"):
        raise error
    print(f"hf-clip {command}: error: {error}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    from .evaluation.cli import run_eval

    args = build_parser().parse_args(argv)
    try:
        result = (getattr(args, "func", None) or run_eval)(args)
    except USER_ERRORS as error:
        return report_error(args.command, error)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
