"""`fescale bench arena-hard {answer,judge,show}` and `fescale sweep`: parsers and their commands.

`engine/cli.py` registers these two parsers and nothing else; every import of real work happens
inside the command, so `fescale --help` stays fast.
"""

from __future__ import annotations

import argparse

BENCH_EPILOG = """\
The files are arena-hard-auto's own (data/arena-hard-v0.1/ layout), so its scripts and fescale's
read each other's output:
  fescale bench arena-hard answer --config greedy --questions data/arena-hard-v0.1/question.jsonl \\
      --model-id my-model --out data/arena-hard-v0.1/model_answer
  fescale bench arena-hard judge --answers data/arena-hard-v0.1/model_answer/my-model.jsonl \\
      --baseline-answers data/arena-hard-v0.1/model_answer/gpt-4-0314.jsonl \\
      --questions data/arena-hard-v0.1/question.jsonl --judge-config judge.yaml \\
      --out data/arena-hard-v0.1/model_judgment/gpt-4-1106-preview
  fescale bench arena-hard show --judgment-dir data/arena-hard-v0.1/model_judgment/gpt-4-1106-preview \\
      --baseline gpt-4-0314 --output scores.json
Rerunning answer or judge skips the questions already in the output file.
"""


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser(
        "bench",
        help="benchmarks: Arena Hard answers, pairwise judge and scores",
        description="Benchmarks of the system's answers.",
    )
    benches = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    arena = benches.add_parser(
        "arena-hard",
        help="Arena Hard (v0.1 as in the paper, or v2.0): answers, judge, scores",
        description="Arena Hard in arena-hard-auto's own file formats: answer the questions with any fescale "
        "config, judge them pairwise against a baseline with an OpenAI-compatible judge, and score them with "
        "Bradley-Terry and bootstrap CIs exactly as arena-hard-auto's show_result.py does.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=BENCH_EPILOG,
    )
    steps = arena.add_subparsers(dest="step", required=True, metavar="STEP")

    show = steps.add_parser(
        "show",
        help="print the leaderboard of a judgment directory (show_result.py) and write scores JSON",
        description="Reads model_judgment/<judge>/*.jsonl (arena-hard-auto's or fescale's) and prints each model's "
        "win rate against the baseline with its 95%% bootstrap CI and average answer tokens, as show_result.py.",
    )
    show.add_argument("--judgment-dir", required=True, help="the model_judgment/<judge>/ directory")
    show.add_argument("--baseline", help="the baseline model [v0.1: gpt-4-0314; v2.0: the rows' `baseline`]")
    show.add_argument("--answer-dir", help="answer files for average tokens [<judgment-dir>/../../model_answer]")
    show.add_argument("--category", help="v2.0 only: the category to score [hard_prompt]")
    show.add_argument("--rounds", type=int, default=100, help="bootstrap rounds [100]")
    show.add_argument("--seed", type=int, default=42, help="bootstrap seed [42, arena-hard-auto's]")
    show.add_argument("--output", help="write {model: {score, ci_low, ci_high, avg_tokens}} (percent) here")
    show.set_defaults(func=cmd_show)


def cmd_show(args: argparse.Namespace) -> int:
    from benchmarks.arena_hard.score import leaderboard_lines, score_dir, write_leaderboard

    scores = score_dir(args.judgment_dir, args.baseline, args.answer_dir, args.category, args.rounds, args.seed)
    print("\n".join(leaderboard_lines(scores)))
    if args.output:
        write_leaderboard(scores, args.output)
        print(f"\nwrote {args.output}")
    return 0

