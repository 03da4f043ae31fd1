"""Run a config over prompts: config -> pools -> steps -> Ray Data stages -> sink, with a summary.

`execute` is what `fescale run` and `fescale distill` share; it streams finished rows into the
sink as the pipeline yields them (the first rows are written while later prompts still generate).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable

import ray
from tqdm import tqdm

from actors.errors import unwrap_ray_error
from engine.cluster import connect
from engine.config import FescaleConfig
from engine.inputs import Prompt
from engine.modes import MAX_STAGES
from engine.pipeline import build_pipeline, to_dataset
from engine.placement import plan_pools, reserved_resources
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
        others = MAX_STAGES * cfg.pipeline.stage_actors * cfg.pipeline.stage_num_cpus
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
    """Run every prompt through the mode's stages into `sink`; returns the completed summary.

    Starts the config's pools (and stops them after) unless running `pools` are passed in.
    """
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # fescale shows one bar in prompts, not one per operator
    ctx.print_on_execution_start = False
    states = new_states(cfg, prompts)
    try:
        if states:
            with contextlib.ExitStack() as stack:
                if pools is None:
                    pools = stack.enter_context(Pools(cfg))
                summary.loaded()
                steps = build_steps(cfg, pools.clients().for_config(cfg))
                ds = build_pipeline(to_dataset(states, cfg.pipeline.batch_size), steps, cfg.pipeline)
                with tqdm(total=len(states), desc=f"fescale {cfg.mode}", unit="prompt", disable=not progress) as bar:
                    for batch in _surface_fescale_errors(ds.iter_batches(batch_size=None, batch_format="numpy")):
                        done = [PromptState.model_validate_json(s) for s in batch["state"]]
                        sink.write(done)
                        summary.add(done)
                        if on_rows:
                            on_rows(done)
                        bar.update(len(done))
                summary.faults(pools.fault_counts())
    finally:
        sink.close()  # commits what finished, also when interrupted
        summary.finish()
    return summary
