"""Engine overhead: how many prompts per second the engine itself sustains when the model costs nothing.

The model is `benchmarks.instant_backend.InstantBackend` (canned answers of realistic length, at
once), behind the same pieces as a real model: a `ModelReplica` pool (`engine.pools.Pools`) and the
Ray Data stage of `engine.runner.execute`. The work is the paper's scaling setup: feedback_edit
with N=8 responses, M=16 feedback per response (16@0.7, all 16 effective), partitioned into sets of
3 (6 sets per response), K=1 edit per set, logit-judge select over the 48 edits; guided_level off.
Prompts are the bundled ones, cycled, each tagged with its id so the backend can tell them apart.

Pools are started and a warm-up batch is run first; the clock covers one `execute` of the measured
prompts (Ray Data starts its stage actors inside it, as in every real run). Reported: prompts/s end
to end and in the steady middle (rows 10%-90%), model calls/s, the stage's Ray Data active time and
the bytes of state a row carries after each step, median hand-offs per prompt (when the backend saw each
prompt's calls), and CPU of the driver (by thread), stage actors, replica and Ray's own processes
(all descendants of the driver, sampled every 0.5 s: those that end with the run count too).

`--distill N` instead runs `fescale distill` over N synthetic prompts (the paper's set is 22,644)
with the instant backend into a temporary folder, SIGKILLs it (with its local Ray cluster) once
half its shards are committed (`benchmarks.faults.kill_distill`), reruns it and checks that every
prompt is in the output exactly once.

    python -m benchmarks.engine_overhead --quick              # 200 prompts
    python -m benchmarks.engine_overhead --batch-size 16 --stage-actors 2
    python -m benchmarks.engine_overhead --distill 22644
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from statistics import median

import psutil
import ray

from benchmarks.efficiency import process_label
from benchmarks.faults import kill_distill
from benchmarks.instant_backend import KINDS, InstantBackend, tagged  # noqa: F401  (also named by this module's path)
from benchmarks.record import record
from benchmarks.workload import DirectClient, prompts
from engine.config import FescaleConfig, load_config
from engine.inputs import Prompt
from engine.placement import plan_pools
from engine.pools import Pools
from engine.runner import execute, init_ray, new_states
from engine.steps import build_steps
from engine.summary import Summary, format_table

REPO = Path(__file__).resolve().parent.parent
RAY_OWN = "Ray's own processes"
BACKEND = "benchmarks.instant_backend:InstantBackend"
ROLE = [f"roles.generator.backend={BACKEND}", "roles.generator.model=embedded", "roles.generator.num_cpus=0.5"]
WORKLOAD = [
    "mode=feedback_edit", "generate.num_responses=8", "feedback.plan=16@0.7", "feedback.effective=16", "feedback.sets=partition",
    "feedback.guided_level=false", "edit.edits_per_set=1", "select.scorer=logit_judge", "select.include_originals=false",
    "generate.max_tokens=2048", "feedback.max_tokens=1024", "edit.max_tokens=2048",
]  # fmt: skip


def synthetic(count: int, prefix: str = "p") -> list[Prompt]:
    """`count` distinct prompts: the bundled ones cycled, each with its id in its first message."""
    out = []
    for k, p in enumerate(prompts(count)):
        first = {**p.messages[0], "content": tagged(f"{prefix}{k}", p.messages[0]["content"])}
        out.append(replace(p, id=f"{prefix}{k}", messages=[first, *p.messages[1:]]))
    return out


class _Arrivals:
    """A sink that keeps when each row reached the driver, and the errors."""

    def __init__(self):
        self.at, self.errors = {}, []  # prompt id -> time.time() its row reached the driver; "stage: message"

    def write(self, states) -> None:
        now = time.time()
        for s in states:
            self.at[s.id] = now
            if s.error is not None:
                self.errors.append(f"{s.error.stage}: {s.error.message}")

    def close(self) -> None:
        pass


class CpuSampler:
    """CPU seconds (user + system) of this process and its descendants, and of this process's threads,
    sampled every `interval` s in a thread: a process or thread that ends mid-run keeps its last sample."""

    def __init__(self, interval: float = 0.5):
        self.interval, self.labels, self.born = interval, {}, {}
        self.series: list[tuple[float, dict[int, float]]] = []  # (time.time(), pid -> CPU s) per sample
        self.start_s, self.last = {}, {}  # pid -> CPU s
        self.threads0, self.threads = {}, {}  # (tid, name) -> CPU s of this process's threads
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> tuple[dict[int, float], dict[tuple[int, str], float]]:
        me = psutil.Process()
        procs: dict[int, float] = {}
        for proc in [me, *me.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                label = process_label(proc)  # a worker is `ray::IDLE` until its actor is placed: keep the last other title
                if proc.pid not in self.labels or label not in ("ray::IDLE", "default_worker.py"):
                    self.labels[proc.pid] = label
                    self.born.setdefault(proc.pid, proc.create_time())
                procs[proc.pid] = t.user + t.system
            except psutil.Error:
                continue
        threads: dict[tuple[int, str], float] = {}
        ticks = os.sysconf("SC_CLK_TCK")
        for tid in os.listdir("/proc/self/task"):
            try:
                name = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
                fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
                threads[(int(tid), name)] = (int(fields[11]) + int(fields[12])) / ticks
            except (OSError, IndexError, ValueError):
                continue
        self.series.append((time.time(), procs))
        return procs, threads

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            procs, threads = self._sample()
            self.last.update(procs)
            self.threads.update(threads)

    def start(self) -> None:
        self.start_s, self.threads0 = self._sample()
        self._thread.start()

    def cores(self, t0: float, t1: float) -> tuple[dict[int, float], float]:
        """(pid -> CPU s per s, the samples' span) between the last sample at or before t0 and the first
        at or after t1; a process that ended in between counts up to its last sample."""
        a = max([k for k, (t, _) in enumerate(self.series) if t <= t0] or [0])
        b = min([k for k, (t, _) in enumerate(self.series) if t >= t1] or [len(self.series) - 1])
        span = self.series[b][0] - self.series[a][0]
        if span <= 0:
            return {}, 0.0
        latest: dict[int, float] = {}
        for _, procs in self.series[a : b + 1]:
            latest.update(procs)
        base = self.series[a][1]
        return {pid: (t - base.get(pid, 0.0)) / span for pid, t in latest.items()}, span

    def stop(self) -> tuple[dict[int, tuple[str, float]], dict[str, float]]:
        """(pid -> (label, CPU s since start)), (driver thread name -> CPU s since start)."""
        self._stop.set()
        self._thread.join()
        procs, threads = self._sample()
        self.last.update(procs)
        self.threads.update(threads)
        spent = {pid: (self.labels.get(pid, "?"), t - self.start_s.get(pid, 0.0)) for pid, t in self.last.items()}
        by_thread: dict[str, float] = {}
        for key, t in self.threads.items():
            by_thread[key[1]] = by_thread.get(key[1], 0.0) + t - self.threads0.get(key, 0.0)
        return spent, by_thread


def state_bytes(cfg: FescaleConfig) -> dict[str, int]:
    """Bytes of one prompt's state JSON (the row's `state` column) after each step, in-process."""
    client = DirectClient(InstantBackend(next(iter(plan_pools(cfg).values())).spec))
    [state] = new_states(cfg, synthetic(1))
    sizes = {"input": len(state.to_json().encode())}

    async def run() -> None:
        for step in build_steps(cfg, lambda role: client):
            await step.run(state)
            sizes[step.name] = len(state.to_json().encode())

    asyncio.run(run())
    return sizes


def _replica_infos(pools: Pools) -> list[dict]:  # what each replica's backend counted so far (`InstantBackend.info`)
    return ray.get([r.ready.remote() for group in pools.replicas.values() for r in group])


def measure(cfg: FescaleConfig, batch: list[Prompt], warmup: list[Prompt]) -> dict:
    """Start the pools, run `warmup`, then time one `execute` of `batch`. Ray must be connected."""
    ctx = ray.data.DataContext.get_current()
    collecting, ctx.enable_stats_summary_collection = ctx.enable_stats_summary_collection, True  # per-operator stats, read below
    try:
        with Pools(cfg) as pools:
            if warmup:
                execute(cfg, warmup, _Arrivals(), Summary(cfg.mode, ""), pools=pools, progress=False)
            before = _replica_infos(pools)
            sink, sampler = _Arrivals(), CpuSampler()
            sampler.start()
            started = time.time()
            summary = execute(cfg, batch, sink, Summary(cfg.mode, cfg.config_hash()), pools=pools, progress=False)
            seconds = time.time() - started
            cpu, driver_threads = sampler.stop()
            after = _replica_infos(pools)
        run = ray.data.list_stats_summaries()[-1]
    finally:
        ctx.enable_stats_summary_collection = collecting
    times = sorted(sink.at.values())
    lo, hi = int(len(times) * 0.1), max(int(len(times) * 0.9) - 1, 0)  # the steady middle: rows 10%-90%
    steady, steady_span = sampler.cores(times[lo], times[hi]) if times else ({}, 0.0)
    rows_span = times[hi] - times[lo] if times else 0.0
    [op] = [op for op in operators(run) if "StageActor" in op.operator_name]
    rows = op.output_num_rows.sum if op.output_num_rows else 0
    stage_stats = {
        "active_s": op.time_total_s,
        "udf_wall_s": op.wall_time.sum if op.wall_time else None,
        "out_bytes_per_row": (op.output_size_bytes.sum / rows) if op.output_size_bytes and rows else None,
    }
    requests_by_kind = {kind: sum(i["requests"].get(kind, 0) - b["requests"].get(kind, 0) for i, b in zip(after, before)) for kind in KINDS}
    arrivals = {tag: t for info in after for tag, t in info["arrivals"].items() if tag in sink.at}
    replica_pids = {info["pid"] for info in after}
    steady_groups = group_cpu({pid: (sampler.labels.get(pid, "?"), c) for pid, c in steady.items()}, replica_pids)
    stage_pids = sorted((pid for pid, c in steady.items() if "MapWorker" in sampler.labels.get(pid, "")), key=lambda pid: sampler.born.get(pid, 0.0))
    return {
        "prompts": len(batch), "answered": summary.prompts, "failed": summary.failed, "errors": sink.errors[:3],
        "seconds": seconds, "started": started, "rows_at": sink.at, "seen_at": arrivals,
        "calls": sum(i["replica_calls"] - b["replica_calls"] for i, b in zip(after, before)),
        "requests": sum(requests_by_kind.values()), "requests_by_kind": requests_by_kind,
        "completions": sum(i["completions"] - b["completions"] for i, b in zip(after, before)),
        "backend_busy_s": sum(i["busy_s"] - b["busy_s"] for i, b in zip(after, before)),
        "stage": stage_stats, "cpu": group_cpu(cpu, replica_pids), "driver_threads": driver_threads,
        "steady_prompts_per_s": (hi - lo) / rows_span if rows_span > 0 else float("nan"), "steady_rows_s": rows_span,
        "steady_cores": {g: sum(v.values()) for g, v in steady_groups.items()}, "steady_window_s": steady_span,
        "steady_stage_actor_cores": [round(steady[pid], 2) for pid in stage_pids],
    }  # fmt: skip


def operators(summary) -> list:
    """A Ray Data run's operator stats in chain order (each operator's summary is its child's parent)."""
    return [op for parent in summary.parents for op in operators(parent)] + list(summary.operators_stats)


def group_cpu(spent: dict[int, tuple[str, float]], replica_pids: set[int]) -> dict[str, dict[str, float]]:
    """CPU seconds by group (driver, stage actors, model replica, Ray's own), each by process label."""
    groups: dict[str, dict[str, float]] = {"driver": {}, "stage actors": {}, "model replica": {}, RAY_OWN: {}}
    for pid, (label, t) in spent.items():
        if t <= 0:
            continue
        group = ("driver" if pid == os.getpid() else "model replica" if pid in replica_pids
                 else "stage actors" if "MapWorker" in label or "StageActor" in label else RAY_OWN)  # fmt: skip
        name = f"{label} pid {pid}" if group == "stage actors" else label  # one title for every stage: keep them apart
        groups[group][name] = groups[group].get(name, 0.0) + t
    return groups


def handoffs(result: dict) -> dict[str, float]:
    """Median seconds per prompt between the calls of successive stages (and the run's start, the driver)."""
    marks = ["start", *KINDS, "driver"]
    gaps: dict[str, list[float]] = {}
    for pid, seen in result["seen_at"].items():
        points = {"start": result["started"], **seen, "driver": result["rows_at"][pid]}
        for a, b in zip(marks, marks[1:]):
            if a in points and b in points:
                gaps.setdefault(f"{a}->{b}", []).append(points[b] - points[a])
    return {k: median(v) for k, v in gaps.items()}


def report(r: dict, sizes: dict[str, int], warmup: int) -> tuple[list[tuple], float]:
    wall, n = r["seconds"], r["answered"]
    rate = n / wall
    steady, steady_s = r["steady_prompts_per_s"], r["steady_rows_s"]
    first = min(r["rows_at"].values()) - r["started"] if r["rows_at"] else float("nan")
    cpu = {group: sum(labels.values()) for group, labels in r["cpu"].items()}
    total_cpu = sum(cpu.values())
    per_prompt = ", ".join(f"{r['requests_by_kind'][k] / max(n, 1):g} {k}" for k in KINDS)

    def top(d: dict[str, float], k: int = 4) -> str:
        return ", ".join(f"{name} {t:.1f}" for name, t in sorted(d.items(), key=lambda kv: -kv[1])[:k] if t >= 0.05)

    rows = [
        ("prompts/s, end to end", f"**{rate:.1f}** ({n} answered, {r['failed']} failed, in {wall:.1f} s; pools and a {warmup}-prompt warm-up before)"),
        ("prompts/s, steady (rows 10%-90%)", f"{steady:.1f} (over {steady_s:.1f} s); first row after {first:.1f} s"),
        ("model calls/s", f"{r['calls'] / wall:.0f}, each {r['requests'] / max(r['calls'], 1):.0f} requests of many prompts on average; "
                          f"{r['requests'] / wall:.0f} requests/s (per prompt: {per_prompt}), {r['completions'] / wall:.0f} completions/s; "
                          f"backend busy {r['backend_busy_s']:.2f} s"),
    ]  # fmt: skip
    s = r["stage"]
    measured = f" (Ray Data: {s['out_bytes_per_row'] / 1024:.1f})" if s["out_bytes_per_row"] else ""
    udf = f", batches in flight {s['udf_wall_s'] / s['active_s']:.1f} on average" if s["udf_wall_s"] and s["active_s"] else ""
    growth = " -> ".join(f"{name} {b / 1024:.1f}" for name, b in sizes.items())
    rows.append(("the method's stage", f"active {s['active_s']:.1f} s{udf}; state KB/row after each step: {growth}{measured}"))
    rows.append(("hand-offs, median per prompt", ", ".join(f"{k} {v:.2f} s" for k, v in handoffs(r).items())))
    stage_procs = sorted(r["cpu"]["stage actors"].values(), reverse=True)
    rows += [
        ("CPU s: driver", f"{cpu['driver']:.1f} (threads: {top(r['driver_threads'])}; `python`, the main thread, parses every finished row)"),
        ("CPU s: stage actors", f"{cpu['stage actors']:.1f} in {len(stage_procs)} processes ({', '.join(f'{t:.1f}' for t in stage_procs)})"),
        ("CPU s: model replica", f"{cpu['model replica']:.1f}"),
        (f"CPU s: {RAY_OWN}", f"{cpu[RAY_OWN]:.1f} ({top(r['cpu'][RAY_OWN])})"),
        ("CPU busy, whole run", f"{total_cpu / wall:.2f} of {os.cpu_count()} cores ({total_cpu:.0f} CPU s in {wall:.1f} s)"),
    ]
    if r["steady_window_s"]:
        c = r["steady_cores"]
        rows.append(("cores in use, steady window", f"{sum(c.values()):.2f} over {r['steady_window_s']:.1f} s: driver {c['driver']:.2f}, stage actors "
                     f"{c['stage actors']:.2f} ({', '.join(map(str, r['steady_stage_actor_cores']))} in start order), model replica "
                     f"{c['model replica']:.2f}, Ray's own {c[RAY_OWN]:.2f}"))  # fmt: skip
    return rows, rate


def run_distill(config: str, overrides: list[str], count: int, shard_size: int, workdir: Path) -> dict:
    """`fescale distill` over `count` prompts, SIGKILLed once half its shards are committed, then rerun."""
    source, out = workdir / "prompts.jsonl", workdir / "out"
    source.write_text("".join(json.dumps({"id": p.id, "messages": p.messages}) + "\n" for p in synthetic(count)))
    args = ["--config", config, *(a for o in overrides for a in ("--set", o)), "--input", str(source),
            "--output-dir", str(out), "--shard-size", str(shard_size), "--quiet"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}
    shards = -(-count // shard_size)
    started = time.monotonic()
    seen_at_kill = kill_distill(args, out, after_shards=max(1, shards // 2), cwd=REPO, env=env, timeout_s=3600)
    killed_s = time.monotonic() - started
    started = time.monotonic()
    rerun = subprocess.run([sys.executable, "-m", "cli", "distill", *args], cwd=REPO, env=env, capture_output=True, text=True)
    rerun_s = time.monotonic() - started
    if rerun.returncode != 0:
        raise RuntimeError(f"the distill rerun failed:\n{rerun.stderr[-3000:]}")
    ids = [json.loads(line)["id"] for f in sorted((out / "data").glob("part-*.jsonl")) for line in f.open()]
    failed = [json.loads(line)["id"] for f in sorted((out / "errors").glob("part-*.jsonl")) for line in f.open()]
    seen = Counter(ids + failed)
    summary = json.loads((out / "summary.json").read_text())
    return {
        "prompts": count, "shards": shards, "shard_size": shard_size, "killed_after_s": killed_s, "shards_seen_at_kill": seen_at_kill,
        "rerun_s": rerun_s, "rerun_summary": summary, "written": len(ids), "failed": len(failed),
        "lost": sum(1 for p in range(count) if seen[f"p{p}"] == 0), "duplicated": sum(c - 1 for c in seen.values() if c > 1),
    }  # fmt: skip


def distill_rows(d: dict) -> list[tuple]:
    s = d["rerun_summary"]
    first = s["resumed"]  # what the killed run had committed, as the rerun found it: its stage actors can
    # still commit shards while the SIGKILL lands, after the count that triggered it
    late = " (the kill landed after the last commit: nothing left to redo)" if not s["prompts"] else ""
    return [
        ("first run (SIGKILLed)", f"{d['killed_after_s']:.1f} s, SIGKILLed on seeing {d['shards_seen_at_kill']} of {d['shards']} shards committed{late}; "
                                  f"{first} prompts committed in all ({first / d['killed_after_s']:.1f} prompts/s including Ray's and the pools' start)"),
        ("rerun", f"{d['rerun_s']:.1f} s ({s['load_s']} s starting pools, {s['wall_s']} s pipeline): {s['resumed']} prompts resumed, "
                  f"{s['prompts']} answered, {s['failed']} failed, {s['prompts'] / s['wall_s'] if s['wall_s'] else 0:.1f} prompts/s in the pipeline"),
        ("every prompt once", f"{d['written']} in data/, {d['failed']} in errors/ of {d['prompts']}: {d['lost']} lost, {d['duplicated']} duplicated"),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="feedback_edit", help="config preset or YAML under the workload's overrides [feedback_edit]")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable), after the workload's")
    p.add_argument("--prompts", type=int, help="prompts measured [2000; --quick 200]")
    p.add_argument("--warmup", type=int, help="prompts run before the clock starts [32; --quick 16]")
    p.add_argument("--quick", action="store_true", help="200 prompts")
    p.add_argument("--batch-size", type=int, help="pipeline.batch_size (prompts per Ray Data batch)")
    p.add_argument("--stage-actors", type=int, help="pipeline.stage_actors (Ray Data actors per stage)")
    p.add_argument("--distill", type=int, metavar="N", help="instead: fescale distill over N prompts, SIGKILLed midway and rerun")
    p.add_argument("--shard-size", type=int, default=64, help="--distill's prompts per shard [64]")
    p.add_argument("--output", default="benchmarks/results/engine_overhead", help="results prefix: .md (appended) and .json")
    args = p.parse_args(argv)

    knobs = [f"pipeline.{key}={value}" for key, value in (("batch_size", args.batch_size), ("stage_actors", args.stage_actors)) if value]
    overrides = [*ROLE, *WORKLOAD, *knobs, *args.set]
    cfg = load_config(args.config, overrides)
    g, f, e, pl = cfg.generate, cfg.feedback, cfg.edit, cfg.pipeline
    work = (f"{cfg.mode}: N={g.num_responses}, M={f.samples}, E={f.effective}, sets {f.sets} of {f.set_size}, K={e.edits_per_set}, select "
            f"{cfg.select.scorer}, guided_level {f.guided_level}; pipeline batch_size {pl.batch_size}, max_concurrent_batches "
            f"{pl.max_concurrent_batches}, stage_actors {pl.stage_actors}; instant backend, replica num_cpus {cfg.roles.generator.num_cpus}")  # fmt: skip
    if args.distill:
        with tempfile.TemporaryDirectory(prefix="fescale-overhead-") as tmp:
            d = run_distill(args.config, overrides, args.distill, args.shard_size, Path(tmp))
        table = format_table([f"fescale distill, {args.distill} prompts, instant model", "measured"], distill_rows(d))
        note = f"{work}; shard size {args.shard_size}, SIGKILL of the job and its local Ray cluster once half the shards were committed, then the same command again"
        record(args.output, "benchmarks.engine_overhead", argv, table, note, {"work": work, "distill": d}, "distill_lost_or_duplicated", d["lost"] + d["duplicated"])
        return 0

    n = args.prompts or (200 if args.quick else 2000)
    warmup = args.warmup if args.warmup is not None else (16 if args.quick else 32)
    sizes, load = state_bytes(cfg), os.getloadavg()[0]  # other work on the machine skews the wall times (not the CPU split)
    init_ray(cfg)
    try:
        r = measure(cfg, synthetic(n), synthetic(warmup, prefix="w"))
    finally:
        ray.shutdown()
    rows, rate = report(r, sizes, warmup)
    table = format_table(["engine overhead, instant model", "measured"], rows)
    note = (f"{work}; {n} synthetic prompts (the bundled ones cycled, tagged); {os.cpu_count()} cores, load average {load:.2f} before the run"
            + (f"; first errors: {r['errors']}" if r["errors"] else ""))  # fmt: skip
    data = {"work": work, "state_bytes": sizes, "handoffs_median_s": handoffs(r),
            **{k: v for k, v in r.items() if k not in ("rows_at", "seen_at", "started")}}  # fmt: skip
    record(args.output, "benchmarks.engine_overhead", argv, table, note, data, "engine_prompts_per_s", f"{rate:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
