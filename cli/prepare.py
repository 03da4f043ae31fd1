"""`fescale prepare WHAT`: data the other commands read, made once.

Bare `fescale prepare` still dequantizes the embedded model (`cli.main.cmd_prepare`, what setup.sh
runs); the subcommands registered here by `add_prepare_parsers` make data: `distill-prompts`, the
paper's distillation prompts from HelpSteer3 (the logic is `train.distill_prompts`).
"""

from __future__ import annotations

import argparse
import sys

from cli.args import add_command
from train.data import listing


def add_prepare_parsers(prepare: argparse.ArgumentParser) -> None:
    """Subcommands of `fescale prepare`; optional, so `fescale prepare` alone keeps its meaning."""
    sub = prepare.add_subparsers(dest="what", metavar="WHAT", title="data to prepare (optional)")
    p = add_command(sub, "distill-prompts", cmd_distill_prompts)
    p.add_argument("--data-dir", required=True, help="the HelpSteer3 folder as published: feedback/train.jsonl.gz (and validation.jsonl.gz)")
    p.add_argument("--output-dir", required=True, help="where train.jsonl and validation.jsonl are written (neither may exist yet)")
    p.add_argument("--validation-fraction", type=fraction, default=0.05,
                   help="only when feedback/validation.jsonl.gz is absent: the share of rows split off, seeded [0.05]")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of that split [0]")


def fraction(text: str) -> float:
    """An argparse type: a number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a number") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text[:40]}")
    return value


def cmd_distill_prompts(args: argparse.Namespace) -> int:
    """the distillation prompts: first-turn, unique prompts of HelpSteer3 `feedback`, train and validation

    The paper distills the system on all unique first-turn prompts of its Feedback data (22,644:
    21,850 train, 794 validation). This writes them as OUTPUT_DIR/train.jsonl and
    OUTPUT_DIR/validation.jsonl, one {id, messages} row per prompt, the input of
    `fescale distill --input OUTPUT_DIR/train.jsonl`, and prints the counts.

    The split is the published one (feedback/train and feedback/validation); a validation prompt
    that train also asks is kept in train only. A conversation with an earlier assistant turn is
    not a first-turn prompt; repeated prompts are kept once.

    A malformed row is reported (FILE:LINE: why) and skipped; the job goes on. Existing files are
    never replaced: the command stops before reading anything if either file exists.
    """
    from train import distill_prompts

    distill_prompts.targets(args.output_dir)  # refuse an occupied output before reading the data
    result = distill_prompts.collect(args.data_dir, args.validation_fraction, args.seed)
    if result.bad:
        print(f"skipped {len(result.bad)} malformed row(s):\n  {listing(result.bad)}", file=sys.stderr)
    for reason, n in result.drops.as_dict().items():
        print(f"left out: {n} {reason}")
    files = distill_prompts.write(result, args.output_dir)
    print(f"{result.counts()} (from {result.rows['train']} + {result.rows['validation']} feedback rows)")
    print(f"wrote {files['train']} and {files['validation']}")
    return 0
