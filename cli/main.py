"""`fescale`: the command line (also `python -m cli`, and under `ray job submit`).

    fescale run                          # the default config on the embedded model, bundled prompts
    fescale run --config best_of_n --input prompts.jsonl --output out.jsonl --set generate.num_responses=8
    fescale distill --config feedback_edit --input prompts.jsonl --output-dir runs/distill   # resumable
    ray job submit --working-dir . -- fescale distill --input data/prompts.jsonl --output-dir /shared/out
    fescale serve --port 8000            # OpenAI-compatible Ray Serve app; per-request knobs in `fescale: {...}`
    fescale serve --write-serve-config serve.yaml && serve run serve.yaml
    fescale train edit-sft --set data.dir=/data/HelpSteer3 --set output_dir=runs/edit-sft   # Ray Train + DeepSpeed
    fescale plan --config paper_70b --cluster 4x8xH100-80GB   # does it fit? memory per GPU, groups per node
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

from actors.errors import ConfigError, FescaleError, last_line, unwrap_ray_error
from cli.args import add_address, add_command, add_config, add_limit, add_quiet, add_set, positive_int
from cli.bench import add_bench_parser, add_sweep_parser
from cli.score import add_score_parser
from cli.prepare import add_prepare_parsers
from engine.config import available_configs, load_config, resolve_config_path
from engine.inputs import DEMO_PROMPTS
from engine.planner import CLUSTER_HELP
from train.config import STAGES

log = logging.getLogger("fescale")
SHOWN_ROWS = 20


def _add_batch_args(p: argparse.ArgumentParser) -> None:
    add_config(p)
    p.add_argument("--print-config", action="store_true", help="print the resolved config (with inherited roles) and exit")
    add_address(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fescale",
        description="Feedback-Edit inference-time scaling on Ray: generate N responses, write M feedback per\n"
        "response, edit each from its feedback K times, and let a reward scorer pick the final answer.",
        formatter_class=argparse.RawDescriptionHelpFormatter,  # the epilog's examples keep their columns
        epilog=__doc__.split("\n", 1)[1],
    )
    parser.add_argument("--debug", action="store_true", help="log at DEBUG and show the traceback of a failure")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = add_command(sub, "run", cmd_run)
    _add_batch_args(run)
    add_limit(run)
    add_quiet(run)
    run.add_argument("--input", default=str(DEMO_PROMPTS), help="JSONL (id + prompt or messages; Arena-Hard; HelpSteer3) or Parquet [bundled demo prompts]")
    run.add_argument("--output", help="output JSONL [runs/<config>.jsonl]")

    distill = add_command(sub, "distill", cmd_distill)
    _add_batch_args(distill)
    add_limit(distill)
    add_quiet(distill)
    distill.add_argument("--input", required=True, help="prompt file or folder, local or a URI (s3://..., gs://...): JSONL (.gz) or Parquet, shapes as for run")
    distill.add_argument("--output-dir", required=True, help="folder or URI for shards, manifest, SFT data and errors")
    distill.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl", help="shard file format [jsonl]")
    distill.add_argument("--shard-size", type=positive_int, default=64, help="prompts per shard: a kill redoes at most the shards in flight [64]")

    serve = add_command(sub, "serve", cmd_serve)
    _add_batch_args(serve)
    serve.add_argument("--host", help="bind address [serve.host, 127.0.0.1]")
    serve.add_argument("--port", type=int, help="HTTP port [serve.port, 8000]")
    serve.add_argument("--metrics-port", type=int, help="Prometheus port of Ray's metrics agent on a local cluster [random]")
    serve.add_argument("--write-serve-config", metavar="PATH", help="write a Serve config file for `serve run`/`serve deploy` and exit")

    train = add_command(sub, "train", cmd_train)
    train.add_argument("stage", choices=STAGES)
    train.add_argument("--config", help="a YAML file or a preset of configs/train (default: the preset named after the stage)")
    add_set(train, "optim.max_steps=20")
    train.add_argument("--dry-run", action="store_true", help="prepare the data, print the report and the step plan, and stop")

    plan = add_command(sub, "plan", cmd_plan)
    add_config(plan)
    plan.add_argument("--cluster", required=True, metavar="SPEC", help="the cluster: " + CLUSTER_HELP)

    add_prepare_parsers(add_command(sub, "prepare", cmd_prepare))
    add_command(sub, "configs", cmd_configs)
    add_bench_parser(sub)
    add_sweep_parser(sub)
    add_score_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s fescale %(levelname)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if args.debug else logging.INFO)
    log.propagate = False
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("fescale: interrupted; finished rows were written (distill: rerun the same command to resume)", file=sys.stderr)
        return 130
    except Exception as e:  # one line for the user; the traceback behind --debug
        own = unwrap_ray_error(e)
        if args.debug:
            raise
        if own is not None:
            print(f"fescale: error: {own}", file=sys.stderr)
            return 2
        print(f"fescale: internal error: {type(e).__name__}: {last_line(e)} (run with --debug for the traceback)", file=sys.stderr)
        return 1


def _load(args: argparse.Namespace):
    """The config and the input of a run: (config, prompts, malformed rows), or None for --print-config."""
    from engine.inputs import read_prompts

    cfg = load_config(args.config, args.set)
    if args.print_config:
        print(cfg.to_yaml())
        return None
    prompts, input_errors = read_prompts(args.input, args.limit)
    log.info("read %d prompts from %s", len(prompts), args.input)
    for e in input_errors:
        log.warning("skipping %s:%d: %s", e.source, e.line, e.error)
    return cfg, prompts, input_errors


def cmd_run(args: argparse.Namespace) -> int:
    """run a config over a prompt file and print prompt -> answer

    Ad-hoc run: one output JSONL (+ .sft.jsonl, .errors.jsonl, .summary.json).
    """
    from engine.runner import execute, init_ray
    from engine.sinks import JsonlSink, sibling
    from engine.summary import Summary, results_table

    loaded = _load(args)
    if loaded is None:
        return 0
    cfg, prompts, input_errors = loaded
    output = Path(args.output or f"runs/{Path(args.config).stem}.jsonl")
    init_ray(cfg, args.address)
    summary = Summary(cfg.mode, cfg.config_hash(), input_errors=len(input_errors))
    finished = []
    execute(cfg, prompts, JsonlSink(output, input_errors), summary, progress=not args.quiet, on_rows=finished.extend)
    sibling(output, ".summary.json").write_text(json.dumps(summary.to_dict(), indent=2))
    order = {p.id: i for i, p in enumerate(prompts)}
    finished.sort(key=lambda s: order[s.id])
    print(results_table(finished[:SHOWN_ROWS]))
    if len(finished) > SHOWN_ROWS:
        print(f"... and {len(finished) - SHOWN_ROWS} more rows")
    print()
    print(summary.table())
    print(f"\nwrote {output} (+ .sft.jsonl, .errors.jsonl, .summary.json)")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    """mass-produce distillation data: shards + manifest on any filesystem, resumable

    Large jobs (also under `ray job submit`): the input is read and the shards are written by the
    workers, on local paths or URIs (s3://, gs://, ...). Rerunning the same command after a crash,
    a kill or `ray job stop` skips the prompts already committed; every prompt ends up exactly once,
    in the output or, with its reason, in the errors. A second job on the same output is refused.
    """
    from engine.distill import distill

    cfg = load_config(args.config, args.set)
    if args.print_config:
        print(cfg.to_yaml())
        return 0
    signal.signal(signal.SIGTERM, _interrupt)  # `ray job stop`: release the output lock, then exit
    summary = distill(cfg, args.input, args.output_dir, fmt=args.format, shard_size=args.shard_size, limit=args.limit,
                      address=args.address, progress=not args.quiet)  # fmt: skip
    print(summary.table())
    print(f"\nwrote {args.output_dir}/ (data/, sft/, errors/, manifest/, summary.json)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """serve the system over HTTP as an OpenAI-compatible Ray Serve app

    Starts the role pools of every served mode and an OpenAI-compatible app (/v1/chat/completions,
    /v1/models, /health) on Ray Serve; runs until SIGTERM or Ctrl-C, which at any moment (start-up too) shut it
    down and exit 0. Requests pick mode and knobs in `fescale: {...}` (openai client: extra_body).
    Settings live in the config's `serve:` section.
    API keys come from serve.api_keys or the FESCALE_API_KEYS environment variable of this command;
    a --host other than loopback needs keys (or serve.allow_unauthenticated=true).
    """
    import time

    overrides = [*args.set, *([f"serve.host={args.host}"] if args.host else []), *([f"serve.port={args.port}"] if args.port is not None else [])]
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(cfg.to_yaml())
        return 0
    from engine.serve_app import api_keys, check_exposure, run_app, serve_config_file

    if args.write_serve_config:
        Path(args.write_serve_config).write_text(serve_config_file(cfg))
        print(f"wrote {args.write_serve_config}: start it with `serve run {args.write_serve_config}` or `serve deploy {args.write_serve_config}`")
        return 0
    from ray import serve

    from cli.stopping import exit_now, serve_until_stopped
    from engine.placement import check_models
    from engine.runner import init_ray

    check_exposure(cfg, api_keys(cfg))  # before anything starts: an open server beyond loopback is refused
    check_models(cfg, cfg.served_modes())
    started = time.monotonic()

    def start() -> str:
        try:
            return run_app(cfg) + "/v1"
        except RuntimeError as e:  # a deployment failed to start; Serve's message names the replica's error
            raise FescaleError(f"the Serve app did not start: {e}") from None

    def ready(url: str) -> None:
        log.info("serving model %r at %s (modes %s) after %.1fs; Ctrl-C stops", cfg.serve.model_name, url, ", ".join(cfg.served_modes()), time.monotonic() - started)

    stopped_by = serve_until_stopped(lambda: init_ray(cfg, args.address, serving=True, metrics_port=args.metrics_port), start, ready, serve.shutdown)
    log.info("stopped on %s", stopped_by)
    exit_now(0)


def cmd_train(args: argparse.Namespace) -> int:
    """train a stage on Ray Train + DeepSpeed (feedback-sft, edit-sft, distill-sft, edit-rm, edit-rloo)

    Prepares the stage's data as the HelpSteer3 paper does (printing what it keeps and drops), then
    trains with the paper's defaults; checkpoints under OUTPUT/ray, the best model in OUTPUT/model.
    Rerunning the same command resumes from the latest checkpoint.
    """
    from train.config import load_train_config
    from train.runner import train

    cfg = load_train_config(args.config or args.stage, args.stage, args.set)
    final = train(cfg, dry_run=args.dry_run)
    if final is not None:
        print(f"model: {final}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """check that a config fits a cluster: memory per GPU, placement groups per node

    From each model's config.json (its local folder, or configs/models/<name>.json): weights and KV
    cache per GPU at the role's tensor-parallel size, every pool's placement groups, the node each
    lands on, and whether it all fits. Exits 2, saying what to change, when it does not. Starts
    nothing.
    """
    from engine.pipeline import STAGES
    from engine.placement import plan_pools
    from engine.planner import parse_cluster, plan_cluster

    cfg = load_config(args.config, args.set)
    cluster = parse_cluster(args.cluster)
    plan = plan_cluster(cfg, plan_pools(cfg).values(), cluster, stage_actors=STAGES * cfg.pipeline.stage_actors)
    print(f"fescale plan: {args.config} (mode {cfg.mode}) on {cluster.text}: {cluster.describe()}\n")
    print(plan.table())
    print()
    if not plan.fits:
        raise ConfigError(plan.verdict())
    print(plan.verdict())
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """dequantize the embedded SmolLM2 model into the local cache (once)"""
    from actors.models import EMBEDDED, resolve_model

    print(f"embedded model ready at {resolve_model(EMBEDDED)}")
    return 0


def cmd_configs(args: argparse.Namespace) -> int:
    """list the config presets"""
    for name in available_configs():
        first = resolve_config_path(name).read_text().splitlines()[0].lstrip("# ").strip()
        print(f"{name:26s} {first}")
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
