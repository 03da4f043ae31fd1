"""`fescale score`: its parser and command (`cli.main` registers the parser; the work is `engine.score_job`).

Kept apart from `cli.main` so the command's imports happen only when it runs and `fescale --help`
stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cli.args import add_address, add_command, add_config, add_quiet


def add_score_parser(sub: argparse._SubParsersAction) -> None:
    score = add_command(sub, "score", cmd_score)
    add_config(score, default="best_of_n", example="select.scorer=token_logit")
    score.add_argument("--input", required=True, help="JSONL (.gz) or Parquet rows: a prompt (messages, prompt, turns or context), `response`, optional `id`")
    score.add_argument("--output", required=True, help="scores file, {id, score} per row: .jsonl or .parquet (errors: <output>.errors.jsonl)")
    add_address(score)
    add_quiet(score)


def cmd_score(args: argparse.Namespace) -> int:
    """score (conversation, response) rows with the config's reward scorer

    Each input row is a prompt in any shape `fescale run` reads (`messages` ending with a user turn,
    `prompt`, Arena-Hard `turns`, HelpSteer3 `context`) plus `response`, the answer to score; `id`
    is optional (default: a hash of prompt and response). The reward model is the config's
    roles.reward (default: the generator's model) and the score is select.scorer's: token_logit, the
    raw logit of select.token_id (default 0) at the last token of the chat-formatted conversation,
    as the released Llama-3.3-Nemotron-70B-Select and Llama-3.1-Nemotron-70B-Reward are read;
    sequence_classification, a classifier head; or logit_judge, log p("Yes") after the judge
    question. Only the reward model is loaded.

    Writes {id, score} per row, in input order, to --output (.jsonl or .parquet: join it back on
    id). A row that cannot be read or scored (not UTF-8, bad JSON, wrong or missing fields, too long
    for the model, ...) goes to <output>.errors.jsonl as {id, line, error} and the job goes on.
    Example: fescale score --config best_of_n_70b --input answers.jsonl --output scores.parquet
    """
    from engine.config import load_config
    from engine.runner import init_ray
    from engine.score_job import output_format, score_file, scoring_config

    cfg = scoring_config(load_config(args.config, args.set))
    output_format(Path(args.output))  # before Ray starts: a wrong extension costs nothing
    init_ray(cfg, args.address)
    counts = score_file(cfg, args.input, args.output, progress=not args.quiet)
    print(f"scored {counts.scored} rows into {args.output}; {counts.input_errors} unreadable and {counts.failed} unscorable rows in the errors file")
    return 0
