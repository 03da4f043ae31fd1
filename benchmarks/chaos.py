"""Chaos run: inject real faults into real runs and count what was lost, duplicated or failed.

Faults, each on the embedded model on a local Ray cluster:
- `replica SIGKILL`: the pool's model replica process is killed (SIGKILL) while prompts are in flight,
  `--kills` times; Ray restarts it and the calls it held are retried.
- `poison prompts`: prompts that crash their replica every time they reach it
  (`benchmarks.faults.FaultyBackend` around the HF backend); each is tried `pipeline.max_attempts` times alone, then written to the
  errors file while the rest of the run goes on.
- `distill SIGKILL`: `fescale distill` and its local Ray cluster are SIGKILLed once 2 shards are
  committed (`benchmarks.faults.kill_distill`); the rerun deletes what no manifest entry lists and
  redoes those prompts.
- `flaky endpoint`: every role on the OpenAI backend, through a proxy that answers every 2nd request
  with a 500, a 429 (Retry-After: 1), a reset connection or malformed JSON (in turn), in front of a real
  OpenAI-compatible server (fescale's own Serve app, greedy).

Per fault: injected count, rows lost (in neither the output nor the errors file), rows duplicated,
rows failed with their reason, and the time the fault cost over a clean run of the same prompts.

    python -m benchmarks.chaos --quick
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import ray
import yaml

from engine.pools import Pools
from benchmarks.faults import faulty_role, kill_distill
from benchmarks.http_stub import Answer, HttpStub
from engine.config import load_config
from engine.inputs import Prompt
from engine.runner import execute, init_ray
from engine.sinks import JsonlSink
from engine.summary import Summary, format_table

REPO = Path(__file__).resolve().parent.parent
# One batch of 2 in flight at a time (one stage actor, one batch): the kills are scheduled by finished
# rows, and with every prompt in flight at once the pool merges their calls, so they would all finish
# before the first kill.
SMALL = ["generate.max_tokens=16", "feedback.max_tokens=12", "edit.max_tokens=16", "roles.generator.num_cpus=1", "roles.generator.threads=2",
         "pipeline.batch_size=2", "pipeline.max_concurrent_batches=1", "pipeline.stage_actors=1"]  # fmt: skip
POISON = "POISON"


def make_prompts(n: int, poison: int = 0) -> list[Prompt]:
    texts = [f"Give one short fact about the number {i}." for i in range(n)]
    for k in range(poison):
        texts[(k * 7 + 3) % n] = f"{POISON} {k}: this prompt crashes its model replica"
    return [Prompt(id=f"p{i}", messages=[{"role": "user", "content": t}], line=i + 1) for i, t in enumerate(texts)]


def tally(ids: list[str], failed: list[str], expected: list[str]) -> dict:
    seen = Counter(ids + failed)
    return {
        "lost": sum(1 for i in expected if seen[i] == 0),
        "duplicated": sum(c - 1 for c in seen.values() if c > 1),
        "failed": len(failed),
    }


def run_pipeline(cfg, prompts: list[Prompt], out: Path, kills: int = 0) -> dict:
    """One run with the pools started here; `kills` SIGKILLs of the replica spread over the run."""
    summary = Summary(cfg.mode, cfg.config_hash())
    restarts_s: list[float] = []
    with Pools(cfg) as pools:
        [replica] = next(iter(pools.replicas.values()))
        marks = [max(1, len(prompts) * (k + 1) // (kills + 1)) for k in range(kills)]
        written = [0]

        def kill_on_schedule(rows):
            written[0] += len(rows)
            while marks and written[0] >= marks[0]:
                marks.pop(0)
                pid = ray.get(replica.ready.remote())["pid"]
                killed_at = time.monotonic()
                os.kill(pid, signal.SIGKILL)
                threading.Thread(target=time_restart, args=(replica, killed_at, restarts_s), daemon=True).start()

        started = time.monotonic()
        execute(cfg, prompts, JsonlSink(out, []), summary, pools=pools, progress=False, on_rows=kill_on_schedule if kills else None)
        seconds = time.monotonic() - started
    ids = [json.loads(line)["id"] for line in open(out)]
    failed = [json.loads(line)["id"] for line in open(out.with_suffix(".errors.jsonl"))]
    reasons = sorted({json.loads(line)["error"].split(" (")[0] for line in open(out.with_suffix(".errors.jsonl"))})
    return {"seconds": seconds, "restart_s": restarts_s, "summary": summary, "reasons": reasons, **tally(ids, failed, [p.id for p in prompts])}


def time_restart(replica, killed_at: float, out: list[float]) -> None:
    """Seconds from a kill until the restarted replica answers (unavailable while Ray restarts it)."""
    while True:
        try:
            ray.get(replica.ready.remote(), timeout=900)
            break
        except ray.exceptions.ActorUnavailableError:
            time.sleep(0.2)
        except ray.exceptions.RayActorError:
            return  # the run ended and its pools were shut down first
    out.append(time.monotonic() - killed_at)


def run_distill_crash(n: int, workdir: Path) -> dict:
    config = workdir / "greedy.yaml"
    config.write_text(yaml.safe_dump({"mode": "greedy", "roles": {"generator": {"num_cpus": 1}}, "generate": {"max_tokens": 8}, "pipeline": {"batch_size": 2}}))
    source = workdir / "prompts.jsonl"
    source.write_text("".join(json.dumps({"id": p.id, "prompt": p.messages[0]["content"]}) + "\n" for p in make_prompts(n)))
    out = workdir / "distill"
    args = ["--config", str(config), "--input", str(source), "--output-dir", str(out), "--shard-size", "2", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}
    kill_distill(args, out, after_shards=2, cwd=REPO, env=env)
    started = time.monotonic()
    resume = subprocess.run([sys.executable, "-m", "cli", "distill", *args], cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - started
    if resume.returncode != 0:
        raise RuntimeError(f"distill resume went wrong:\n{resume.stderr[-2000:]}")
    ids = [json.loads(line)["id"] for f in sorted((out / "data").glob("part-*.jsonl")) for line in open(f)]
    redone = json.loads((out / "summary.json").read_text())["prompts"]
    return {"seconds": seconds, "redone": redone, **tally(ids, [], [f"p{i}" for i in range(n)])}


class FlakyProxy:
    """Forwards POSTs to `upstream`; every `every`-th request gets the next fault instead."""

    ANSWERS = {
        "500": (500, b'{"error": {"message": "injected"}}', {}),
        "429": (429, b'{"error": {"message": "slow down"}}', {"Retry-After": "1"}),
        "reset": None,  # the connection is dropped without an answer
        "malformed": (200, b'{"id": "x", "choices": [', {}),
    }
    FAULTS = tuple(ANSWERS)  # injected in this order, round and round

    def __init__(self, upstream: str, every: int = 2):
        self.injected: Counter = Counter()
        self.upstream, self.every = upstream, every
        self.count = itertools.count(1)
        self.stub = HttpStub(self.handle)
        self.url = self.stub.url

    def handle(self, path: str, body: bytes) -> Answer | None:
        n = next(self.count)
        if n % self.every == 0:
            fault = self.FAULTS[(n // self.every) % len(self.FAULTS)]
            self.injected[fault] += 1
            return self.ANSWERS[fault]
        conn = http.client.HTTPConnection(self.upstream, timeout=600)
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        try:
            answer = conn.getresponse()
            return answer.status, answer.read(), {}
        finally:
            conn.close()

    def close(self) -> None:
        self.stub.close()


def run_flaky_endpoint(prompts: list[Prompt], workdir: Path) -> tuple[dict, dict]:
    """The same greedy prompts through the OpenAI backend: straight to the server, then through the flaky proxy."""
    from ray import serve

    from engine.serve_app import run_app

    base = run_app(load_config("greedy", [*SMALL[:1], "roles.generator.num_cpus=1", "serve.port=8799"]))
    results = []
    try:
        for name, url in (("clean", f"{base}/v1"), ("flaky", None)):
            proxy = FlakyProxy(base.removeprefix("http://")) if name == "flaky" else None
            endpoint = {"base_url": proxy.url if proxy else url, "max_retries": 5, "timeout_s": 60}
            cfg = load_config("greedy", [f"roles.generator={json.dumps({'model': 'fescale', 'backend': 'openai', 'num_cpus': 0.1, 'endpoint': endpoint})}", "generate.max_tokens=16"])
            result = run_pipeline(cfg, prompts, workdir / f"endpoint-{name}.jsonl")
            result["injected"] = sum(proxy.injected.values()) if proxy else 0
            result["kinds"] = dict(proxy.injected) if proxy else {}
            results.append(result)
            if proxy:
                proxy.close()
    finally:
        serve.shutdown()
    return results[0], results[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer prompts and faults (a few minutes here)")
    p.add_argument("--prompts", type=int, help="prompts per run [12; quick 6]")
    p.add_argument("--output", default="benchmarks/results/chaos", help="results prefix: .md (appended) and .json")
    args = p.parse_args(argv)
    n = args.prompts or (6 if args.quick else 12)
    kills, poison = (1, 1) if args.quick else (3, 2)
    workdir = Path(tempfile.mkdtemp(prefix="fescale-chaos-"))

    mode = "best_of_n" if args.quick else "feedback_edit"
    overrides = [f"mode={mode}", "generate.num_responses=2", *SMALL]
    cfg = load_config("feedback_edit", overrides)
    init_ray(cfg)
    clean = run_pipeline(cfg, make_prompts(n), workdir / "clean.jsonl")
    killed = run_pipeline(cfg, make_prompts(n), workdir / "killed.jsonl", kills=kills)
    poison_role = faulty_role(cfg.roles.generator.model_dump(), crash_on=POISON)
    poisoned_cfg = load_config("feedback_edit", [*overrides, f"roles.generator={json.dumps(poison_role)}"])
    poisoned = run_pipeline(poisoned_cfg, make_prompts(n, poison), workdir / "poison.jsonl")
    endpoint_clean, flaky = run_flaky_endpoint(make_prompts(n), workdir)
    ray.shutdown()
    crash = run_distill_crash(n, workdir)

    def extra(r, base):
        return f"{r['seconds'] - base['seconds']:+.1f} s"

    mean = lambda xs: f"{sum(xs) / len(xs):.1f} s" if xs else "n/a"  # noqa: E731
    rows = [
        ("replica SIGKILL", str(kills), str(killed["lost"]), str(killed["duplicated"]), str(killed["failed"]), f"{extra(killed, clean)} (restart to ready {mean(killed['restart_s'])})",
         f"{killed['summary'].replica_restarts} restarts, {killed['summary'].retries} retried calls"),
        ("poison prompts", str(poison), str(poisoned["lost"]), str(poisoned["duplicated"]), str(poisoned["failed"]), extra(poisoned, clean),
         f"{poisoned['summary'].replica_restarts} restarts; errors file: {'; '.join(poisoned['reasons'])}"),
        ("distill SIGKILL", "1", str(crash["lost"]), str(crash["duplicated"]), "0", f"resume {crash['seconds']:.1f} s",
         f"rerun redid {crash['redone']} prompts (the shards in flight and the rest)"),
        ("flaky endpoint", str(flaky["injected"]), str(flaky["lost"]), str(flaky["duplicated"]), str(flaky["failed"]), extra(flaky, endpoint_clean),
         ", ".join(f"{v}x {k}" for k, v in sorted(flaky["kinds"].items()))),
    ]
    table = format_table(["fault", "injected", "rows lost", "rows duplicated", "rows failed (errors file)", "time cost vs clean run", "notes"], rows)
    note = f"{n} prompts per run, mode {mode} (N=2) on the embedded model; clean run {clean['seconds']:.1f} s"
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.chaos " + " ".join(argv if argv is not None else sys.argv[1:])
    with out.with_suffix(".md").open("a") as f:
        f.write(f"\n## {time.strftime('%Y-%m-%d %H:%M')} `{command.strip()}`\n\n{table}\n\n{note}\n")
    out.with_suffix(".json").write_text(json.dumps({"note": note, "rows": rows}, indent=2))
    print(table)
    print(f"\n{note}")
    lost = killed["lost"] + poisoned["lost"] + crash["lost"] + flaky["lost"]
    duplicated = killed["duplicated"] + poisoned["duplicated"] + crash["duplicated"] + flaky["duplicated"]
    print(f"rows_lost_or_duplicated={lost + duplicated}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
