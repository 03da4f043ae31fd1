"""Run a config over prompts: config -> pools -> steps -> Ray Data stages -> sink, with a summary.

`execute` is what `fescale run` and `fescale distill` share; it streams finished rows into the
sink as the pipeline yields them (the first rows are written while later prompts still generate).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Callable

import ray
from tqdm import tqdm

from actors.errors import unwrap_ray_error
from engine.cluster import connect
from engine.config import FescaleConfig
from engine.inputs import Prompt
from engine.pipeline import STAGES, build_pipeline, for_rows, to_dataset
from engine.placement import plan_pools, reserved_resources
from engine.planner import check_cluster
from engine.pools import Pools
from engine.rows import Message, PromptState
from engine.sinks import Sink
from engine.steps import build_steps
from engine.summary import Summary

log = logging.getLogger("fescale")


def init_ray(cfg: FescaleConfig, address: str | None = None, *, serving: bool = False, metrics_port: int | None = None) -> None:
    """Connect to Ray (`engine.cluster.connect`); a local cluster is sized for the replicas'
    reservations plus the light stage actors (or, `serving`, the pools of every served mode plus
    the Serve ingress replicas)."""
    modes = cfg.served_modes() if serving else None
    replicas_cpus = reserved_resources([p.role for p in plan_pools(cfg, modes).values()]).get("CPU", 0.0)
    if serving:
        s = cfg.serve
        others = s.num_cpus * int((s.autoscaling or {}).get("max_replicas", s.num_replicas))
    else:
        others = STAGES * cfg.pipeline.stage_actors * cfg.pipeline.stage_num_cpus
    connect(address, replicas_cpus + others, metrics_port=metrics_port)


def _surface_fescale_errors(batches):
    """Yield the pipeline's batches; a fescale error raised in a stage (a pool out of restarts, say)
    comes out as itself, not wrapped in Ray Data's and Ray's exceptions."""
    try:
        yield from batches
    except Exception as e:
        own = unwrap_ray_error(e)
        if own is not None:
            raise own from None
        raise


def new_states(cfg: FescaleConfig, prompts: list[Prompt]) -> list[PromptState]:
    config_hash = cfg.config_hash()
    return [
        PromptState(id=p.id, messages=[Message(**m) for m in p.messages], mode=cfg.mode, config_hash=config_hash)
        for p in prompts
    ]


def execute(
    cfg: FescaleConfig,
    prompts: list[Prompt],
    sink: Sink,
    summary: Summary,
    *,
    pools: Pools | None = None,
    progress: bool = True,
    on_rows: Callable[[list[PromptState]], None] | None = None,
) -> Summary:
    """Run prompts held by the driver through the method's stage into a driver-side `sink`
    (`fescale run`, the benchmarks); returns the completed summary."""
    states = new_states(cfg, prompts)

    def on_batch(batch) -> int:
        done = [PromptState.from_json(s) for s in batch["state"]]
        sink.write(done)
        summary.add(done)
        if on_rows:
            on_rows(done)
        return len(done)

    try:
        if states:
            run_stream(cfg, to_dataset(states, cfg.pipeline.batch_size), len(states), summary, on_batch, pools=pools, progress=progress)
    finally:
        sink.close()  # commits what finished, also when interrupted
        summary.finish()
    return summary


def run_stream(
    cfg: FescaleConfig,
    rows: ray.data.Dataset,
    total: int,
    summary: Summary,
    on_batch: Callable[[dict], int],
    *,
    pools: Pools | None = None,
    progress: bool = True,
    finish: tuple[dict, int] | None = None,
) -> None:
    """Stream pipeline rows `{id, state}` through the method's stage; `on_batch` hears each finished
    batch and says how many prompts it held (the progress bar). `finish` = (map_batches arguments,
    batch size) of a last stage that consumes the rows where they are (the distill writers).

    Starts the config's pools (and stops them after) unless running `pools` are passed in.
    """
    pipeline = for_rows(cfg.pipeline, total)
    with contextlib.ExitStack() as stack:
        if pools is None:
            check_cluster(cfg, plan_pools(cfg).values(), (1 + (finish is not None)) * pipeline.stage_actors)
            pools = stack.enter_context(Pools(cfg))
        summary.loaded()
        ds = build_pipeline(rows, build_steps(cfg, pools.clients().for_config(cfg)), pipeline)
        if finish is not None:
            stage, batch_size = finish
            ds = ds.map_batches(**stage, batch_size=batch_size, batch_format="numpy", num_cpus=pipeline.stage_num_cpus,
                                compute=ray.data.ActorPoolStrategy(size=pipeline.stage_actors))  # fmt: skip
        # fescale shows one bar in prompts, not Ray Data's per operator (nor, off a terminal, its log
        # lines every 10 s). On the dataset's own context: a dataset keeps the one it was made with.
        ds.context.enable_progress_bars = False
        ds.context.print_on_execution_start = False
        # Nor Ray Data's per-task memory stats: each map task started a thread polling its process's
        # USS, 7% of a stage actor's CPU in benchmarks.engine_overhead, for numbers nobody reads.
        ds.context.memory_usage_poll_interval_s = None
        # A bar only on a terminal: job logs (`ray job submit`, a file) get the summary, not bar redraws.
        with tqdm(total=total, desc=f"fescale {cfg.mode}", unit="prompt", disable=not progress or not sys.stderr.isatty()) as bar:
            for batch in _surface_fescale_errors(ds.iter_batches(batch_size=None, batch_format="numpy")):
                bar.update(on_batch(batch))
        summary.faults(pools.fault_counts())
