"""The flags every `fescale` command spells the same way, defined once: --config/--set, --address,
--limit, --quiet, and the number types that reject zero, negative and non-numeric values up front;
and `add_command`, which documents each command once, in its function's docstring."""

from __future__ import annotations

import argparse
import inspect
from typing import Callable

SET_HELP = "override a key, e.g. --set {example} (repeatable; the value is YAML)"


class ParagraphFormatter(argparse.HelpFormatter):
    """argparse's formatter, but a description's paragraphs stay apart: each is refilled to the
    terminal's width on its own (argparse would run them together into one)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        fill = super()._fill_text
        return "\n\n".join(fill(paragraph, width, indent) for paragraph in text.split("\n\n"))


def add_command(sub: argparse._SubParsersAction, name: str, func: Callable[[argparse.Namespace], int], **parser_kwargs) -> argparse.ArgumentParser:
    """The subcommand `name`, run by `func`, documented by `func`'s docstring and nowhere else.

    The docstring's first line is the help listed under the parent command; the rest (dedented,
    paragraphs kept) is the description of `fescale ... NAME --help`. Write `%` plainly: the help
    line is escaped here for argparse, which %-formats it (and leaves the description alone).
    """
    summary, _, rest = inspect.cleandoc(func.__doc__ or "").partition("\n")
    parser_kwargs.setdefault("formatter_class", ParagraphFormatter)
    p = sub.add_parser(name, help=summary.replace("%", "%%"), description=rest.strip() or None, **parser_kwargs)
    p.set_defaults(func=func)
    return p


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (an ArgumentTypeError is argparse's usage error naming the flag)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text[:40]}")
    return value


def add_set(p: argparse.ArgumentParser, example: str, flag: str = "--set", what: str = "") -> None:
    p.add_argument(flag, action="append", default=[], metavar="KEY=VALUE", dest=flag.lstrip("-").replace("-", "_"),
                   help=(f"{what}: " if what else "") + SET_HELP.format(example=example))  # fmt: skip


def add_config(p: argparse.ArgumentParser, default: str | None = "feedback_edit", example: str = "generate.num_responses=4") -> None:
    """--config (a preset name or a YAML file) and --set overrides."""
    shown = f" [{default}]" if default else ""
    p.add_argument("--config", default=default, help=f"a preset name (see `fescale configs`) or a YAML file{shown}")
    add_set(p, example)


def add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster to join, e.g. auto or HOST:6379 (default: RAY_ADDRESS, else start a local cluster)")


def add_limit(p: argparse.ArgumentParser, what: str = "valid prompts") -> None:
    p.add_argument("--limit", type=positive_int, help=f"use only the first N {what}")


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bar")
