"""`fescale bench arena-hard {answer,judge,show}` and `fescale sweep`: parsers and their commands.

`cli.main` registers these two parsers; every import of real work happens inside the command, so
`fescale --help` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cli.args import add_address, add_command, add_config, add_limit, add_quiet, add_set, positive_int

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
        description="Arena Hard in arena-hard-auto's own file formats: answer the questions with any fescale\n"
        "config, judge them pairwise against a baseline with an OpenAI-compatible judge, and score them\n"
        "with Bradley-Terry and bootstrap CIs exactly as arena-hard-auto's show_result.py does.",
        formatter_class=argparse.RawDescriptionHelpFormatter,  # the epilog's commands keep their layout
        epilog=BENCH_EPILOG,
    )
    steps = arena.add_subparsers(dest="step", required=True, metavar="STEP")

    answer = add_command(steps, "answer", cmd_answer)
    add_config(answer)
    answer.add_argument("--questions", required=True, help="arena-hard-auto question.jsonl (v0.1 or v2.0)")
    answer.add_argument("--model-id", required=True, help="the model id in the rows and the file name")
    answer.add_argument("--out", required=True, help="the model_answer/ directory")
    answer.add_argument("--tokenizer", help="local tokenizer folder for token_len [the generator's model]")
    add_limit(answer, "questions")
    answer.add_argument("--concurrency", type=positive_int, help="questions in flight [pipeline.batch_size x max_concurrent_batches]")
    add_address(answer)
    add_quiet(answer)

    judge = add_command(steps, "judge", cmd_judge)
    judge.add_argument("--questions", required=True, help="arena-hard-auto question.jsonl")
    judge.add_argument("--answers", required=True, help="the model's answer file")
    judge.add_argument("--baseline-answers", required=True, help="the baseline's answer file (v0.1: gpt-4-0314.jsonl)")
    judge.add_argument("--judge-config", help="judge YAML or a preset in configs/judges/ [the paper's gpt-4-1106-preview on OpenAI]")
    add_set(judge, "max_tokens=512", flag="--judge-set", what="a judge config key")
    judge.add_argument("--out", required=True, help="the model_judgment/ directory")
    add_quiet(judge)

    show = add_command(steps, "show", cmd_show)
    show.add_argument("--judgment-dir", required=True, help="the model_judgment/<judge>/ directory")
    show.add_argument("--baseline", help="the baseline model [v0.1: gpt-4-0314; v2.0: the rows' `baseline`]")
    show.add_argument("--answer-dir", help="answer files for average tokens [<judgment-dir>/../../model_answer]")
    show.add_argument("--category", help="v2.0 only: the category to score [hard_prompt]")
    show.add_argument("--rounds", type=positive_int, default=100, help="bootstrap rounds [100]")
    show.add_argument("--seed", type=int, default=42, help="bootstrap seed [42, arena-hard-auto's]")
    show.add_argument("--output", help="write {model: {score, ci_low, ci_high, avg_tokens}} (percent) here")


def cmd_show(args: argparse.Namespace) -> int:
    """print the leaderboard of a judgment directory (show_result.py) and write scores JSON

    Reads model_judgment/<judge>/*.jsonl (arena-hard-auto's or fescale's) and prints each model's
    win rate against the baseline with its 95% bootstrap CI and average answer tokens, as
    show_result.py.
    """
    from benchmarks.arena_hard.score import leaderboard_lines, score_dir, write_leaderboard

    scores = score_dir(args.judgment_dir, args.baseline, args.answer_dir, args.category, args.rounds, args.seed)
    print("\n".join(leaderboard_lines(scores)))
    if args.output:
        write_leaderboard(scores, args.output)
        print(f"\nwrote {args.output}")
    return 0


def cmd_answer(args: argparse.Namespace) -> int:
    """answer the questions with a fescale config into <out>/<model-id>.jsonl (resumable)

    Runs any fescale config (greedy, best_of_n, feedback_edit, the ablations) over question.jsonl
    and writes arena-hard-auto answer rows with token_len counted by the generator's tokenizer,
    plus, under `fescale`, the tokens the whole system spent on each answer and its latency.
    Questions already in the file are skipped.
    """
    from benchmarks.arena_hard.answer import answer_questions
    from benchmarks.arena_hard.formats import read_questions
    from engine.config import load_config
    from engine.runner import init_ray

    cfg = load_config(args.config, args.set)
    questions = read_questions(args.questions)[: args.limit]
    init_ray(cfg, args.address)
    run = answer_questions(cfg, questions, args.model_id, Path(args.out), tokenizer=args.tokenizer, concurrency=args.concurrency, progress=not args.quiet)
    print(run.summary.table())
    print(f"\n{run.answered} answered, {run.resumed} already in {run.path}, {run.failed} failed")
    return 0


def cmd_judge(args: argparse.Namespace) -> int:
    """judge a model's answers pairwise against the baseline's (two games per question, resumable)

    Two games per question with the positions swapped, arena-hard-auto's judge prompt and template,
    one continuation when the judge gave no [[verdict]]. The judge is any OpenAI-compatible endpoint
    named in --judge-config (YAML: model, endpoint {base_url, api_key_env, timeout_s, max_retries,
    max_concurrency}, baseline, temperature, max_tokens), or a local model (backend: hf or vllm,
    model: a folder or 'embedded'; see configs/judges/embedded.yaml); default: gpt-4-1106-preview on
    api.openai.com with $OPENAI_API_KEY. Writes <out>/<judge name>/<model>.jsonl; questions already
    there are skipped.
    """
    from benchmarks.arena_hard.formats import read_questions
    from benchmarks.arena_hard.judge import judge_answers, load_judge_config

    cfg = load_judge_config(args.judge_config, args.judge_set)
    out = judge_answers(cfg, read_questions(args.questions), Path(args.answers), Path(args.baseline_answers), Path(args.out) / cfg.judge_name, progress=not args.quiet)
    print(f"judgments in {out}")
    return 0


def add_sweep_parser(sub: argparse._SubParsersAction) -> None:
    sweep = add_command(sub, "sweep", cmd_sweep)
    sweep.add_argument("--grid", required=True, help="grid YAML or a preset in configs/sweeps/")
    add_set(sweep, "limit=4", what="a grid key")
    sweep.add_argument("--out", help="sweep directory [runs/sweeps/<grid name>]")
    sweep.add_argument("--questions", help="question.jsonl [the grid's `questions`]")
    sweep.add_argument("--baseline-answers", help="baseline answer file [the grid's `baseline_answers`]")
    sweep.add_argument("--judge-config", help="judge YAML or a preset in configs/judges/ [the grid's `judge`]")
    sweep.add_argument("--limit", type=positive_int, help="only the first N questions [the grid's `limit`]")
    sweep.add_argument("--pick-for-budget", type=float, metavar="TOKENS", help="best point within TOKENS generated tokens per answer")
    sweep.add_argument("--target-score", type=float, metavar="SCORE", help="cheapest point scoring at least SCORE")
    add_address(sweep)
    add_quiet(sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    """scaling sweep on Arena Hard: a grid over config keys, each point answered, judged and scored

    Runs every point of a grid file (see configs/sweeps/) through answer -> judge -> score, reusing
    what --out already holds, and writes sweep.json, sweep.md and the plots scaling.png (score vs
    tokens, log2, per axis, 95% CI bars) and pareto.png. With --pick-for-budget or --target-score
    it reads an existing sweep.json and names the best config within a token budget / the cheapest
    reaching a score.
    """
    from benchmarks.arena_hard.sweep import cheapest_reaching, load_grid, load_results, markdown_table, pick_for_budget, run_sweep

    grid = load_grid(args.grid, args.set)
    out = Path(args.out or f"runs/sweeps/{grid.name}")
    if args.pick_for_budget is None and args.target_score is None:
        results = run_sweep(grid, out, questions=args.questions, baseline_answers=args.baseline_answers, judge=args.judge_config,
                            limit=args.limit, address=args.address, progress=not args.quiet)  # fmt: skip
        print(markdown_table(results))
        print(f"\nwrote {out}/sweep.json, sweep.md, scaling.png, pareto.png")
        return 0
    results = load_results(out)
    for title, pick in (
        (f"best within {args.pick_for_budget} generated tokens/answer", pick_for_budget(results, args.pick_for_budget) if args.pick_for_budget is not None else False),
        (f"cheapest reaching score {args.target_score}", cheapest_reaching(results, args.target_score) if args.target_score is not None else False),
    ):
        if pick is False:
            continue
        print(f"{title}: " + ("none" if pick is None else f"{pick.axis}={pick.label} ({pick.model_id}): score {pick.score} ({pick.ci_low}, {pick.ci_high}), {pick.generated_tokens:.0f} tokens/answer"))
    return 0
