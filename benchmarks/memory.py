"""Memory of the main job: peak RSS of every process of `fescale run` with the default config.

Runs `fescale run` (Feedback-Edit on the embedded SmolLM2, HF backend, the bundled prompts) as a
child process and follows its whole process tree with psutil every `--interval` seconds: the driver, the model replica (one pool serves all four roles), the Ray Data
stage actors, the pools' events actor, idle Ray workers and Ray's own processes (GCS, raylet, agents).
Processes are told apart by the titles Ray gives them (`ray::ModelReplica`, `ray::MapWorker(...)`).
A process's peak RSS is the kernel's own high-water mark (`VmHWM`), so a spike between samples counts.

The totals are the largest sums over all processes at one sample. Summed RSS counts a page shared
between processes (torch's and Ray's libraries, the object store) once in every process that maps it,
so it overstates the job's memory; summed PSS (proportional set size: each shared page split between
the processes sharing it) is what the job costs the machine, and it is what must stay under
`--budget-mb` (4 GB; the exit status is 1 when it does not). MB here are 2^20 bytes.

    python -m benchmarks.memory            # the default run: 4 prompts, about 4 minutes here
    python -m benchmarks.memory --quick    # 1 prompt, shorter answers: under 3 minutes here
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from engine.placement import plan_pools
from benchmarks.record import record
from engine.config import load_config
from engine.summary import format_table

REPO = Path(__file__).resolve().parent.parent
QUICK = ["--limit", "1", "--set", "generate.max_tokens=24", "--set", "feedback.max_tokens=16", "--set", "edit.max_tokens=24"]
RAY_DATA_ACTORS = ("_StatsActor", "_AutoscalingCoordinatorActor", "ActorLocationTracker")
STARTING = "Ray worker (idle)"
KINDS = ["driver", "model replica", "Ray Data stage actor", "Ray Data internal actor", "pool events actor", "Ray worker", STARTING, "Ray system"]


@dataclass
class Proc:
    """One process of the job: what it is (the most specific title seen) and its peak RSS and PSS."""

    pid: int
    kind: str
    name: str
    peak_mb: float = 0.0
    peak_pss_mb: float = 0.0


@dataclass
class Sampler:
    """Samples the RSS of a process and all its descendants until stopped."""

    root: int
    interval: float
    procs: dict[int, Proc] = field(default_factory=dict)
    peak_total_mb: float = 0.0
    peak_pss_total_mb: float = 0.0
    samples: int = 0

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.sample()
            stop.wait(self.interval)

    def sample(self) -> None:
        try:
            root = psutil.Process(self.root)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        total = pss_total = 0.0
        for p in tree:
            try:
                mem = p.memory_full_info()  # rss, and pss: shared pages split between their processes
                kind, name = classify(p, self.root)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss, pss = mem.rss / 2**20, mem.pss / 2**20
            total, pss_total = total + rss, pss_total + pss
            seen = self.procs.setdefault(p.pid, Proc(p.pid, kind, name))
            if kind != STARTING:  # a worker that became an actor keeps its actor's name
                seen.kind, seen.name = kind, name
            seen.peak_mb = max(seen.peak_mb, rss, high_water_mb(p.pid))
            seen.peak_pss_mb = max(seen.peak_pss_mb, pss)
        self.peak_total_mb = max(self.peak_total_mb, total)
        self.peak_pss_total_mb = max(self.peak_pss_total_mb, pss_total)
        self.samples += 1


def high_water_mb(pid: int) -> float:
    """The peak RSS the kernel recorded for a process (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            line = next(line for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0.0
    return int(line.split()[1]) / 1024  # kB


def classify(p: psutil.Process, driver: int) -> tuple[str, str]:
    """(kind, name) of a process from its command line, which Ray sets to `ray::<actor or task>`."""
    if p.pid == driver:
        return "driver", "fescale run"
    argv = p.cmdline()
    cmd = " ".join(argv)
    if not cmd.startswith("ray::"):
        if not p.name().startswith("python"):
            return "Ray system", p.name()  # gcs_server, raylet
        if "default_worker.py" in cmd:  # a worker before Ray names it
            return STARTING, "starting"
        return "Ray system", next((Path(a).stem for a in argv[1:] if a.endswith(".py")), p.name())  # python -u .../monitor.py
    title = cmd.split()[0].removeprefix("ray::").split(".")[0]
    if title == "ModelReplica":
        return "model replica", title
    if title.startswith("MapWorker"):
        return "Ray Data stage actor", title
    if title in RAY_DATA_ACTORS:
        return "Ray Data internal actor", title
    if title == "PoolEvents":
        return "pool events actor", title
    if title.endswith("Agent"):
        return "Ray system", title
    if title == "IDLE":
        return STARTING, title
    return "Ray worker", title


def report(sampler: Sampler) -> str:
    """One row per process kind (several processes: their count and the largest), then the whole job."""
    rows = []
    for kind in KINDS:
        procs = sorted((p for p in sampler.procs.values() if p.kind == kind), key=lambda p: -p.peak_mb)
        if not procs:
            continue
        names = ", ".join(sorted({p.name for p in procs}))
        each = f"{procs[0].peak_mb:.0f}" + (f" (largest of {len(procs)}; all: {sum(p.peak_mb for p in procs):.0f})" if len(procs) > 1 else "")
        rows.append((kind, names, str(len(procs)), each, f"{sum(p.peak_pss_mb for p in procs):.0f}"))
    rows.append(("**whole job, at its peak**", "", str(len(sampler.procs)), f"**{sampler.peak_total_mb:.0f}**", f"**{sampler.peak_pss_total_mb:.0f}**"))
    return format_table(["process", "Ray title", "processes", "peak RSS (MB)", "peak PSS (MB)"], rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 prompt and shorter answers (under 3 minutes here)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between samples of the whole job's total [1.0]")
    p.add_argument("--budget-mb", type=float, default=4096, help="the most the whole job may use (summed PSS) [4096]")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override passed to fescale run (repeatable)")
    p.add_argument("--output", default="benchmarks/results/memory", help="results prefix: .md (appended) and .json [benchmarks/results/memory]")
    args = p.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="fescale-memory-"))
    extra = (QUICK if args.quick else []) + [a for kv in args.set for a in ("--set", kv)]
    command = [sys.executable, "-m", "cli", "run", "--quiet", "--output", str(workdir / "out.jsonl"), *extra]
    started = time.monotonic()
    with open(workdir / "run.log", "w") as log:
        job = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        sampler, stop = Sampler(job.pid, args.interval), threading.Event()
        thread = threading.Thread(target=sampler.run, args=(stop,), daemon=True)
        thread.start()
        code = job.wait()
        stop.set()
        thread.join()
    seconds = time.monotonic() - started
    if code != 0:
        print((workdir / "run.log").read_text()[-4000:], file=sys.stderr)
        print(f"fescale run failed (exit {code}); its log: {workdir / 'run.log'}", file=sys.stderr)
        return code

    table = report(sampler)
    within = sampler.peak_pss_total_mb <= args.budget_mb
    summary = json.loads((workdir / "out.summary.json").read_text())
    cfg = load_config("feedback_edit", [kv for flag, kv in zip(extra, extra[1:]) if flag == "--set"])  # fescale run's default
    pools = "; ".join(f"{p.name} x {p.role.replicas} ({', '.join(p.roles)})" for p in plan_pools(cfg).values())
    note = (
        f"`{' '.join(['fescale run', *extra])}` (model replicas: {pools}): {summary['prompts']} prompts answered, {summary['failed']} failed, in {seconds:.0f} s; "
        f"{sampler.samples} samples every {args.interval:g} s; whole job peak {sampler.peak_pss_total_mb:.0f} MB PSS, "
        f"{'within' if within else 'OVER'} the {args.budget_mb:.0f} MB budget ({sampler.peak_total_mb:.0f} MB summed RSS)"
    )
    data = {"peak_rss_total_mb": sampler.peak_total_mb, "peak_pss_total_mb": sampler.peak_pss_total_mb, "processes": [vars(p) for p in sampler.procs.values()]}
    record(args.output, "benchmarks.memory", argv, table, note, data, "peak_rss_total_mb", f"{sampler.peak_total_mb:.0f}")
    return 0 if within else 1


if __name__ == "__main__":
    raise SystemExit(main())
