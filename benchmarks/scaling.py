"""Scaling: distillation prompts/hour with 1 vs 2 model replicas, and 2 replicas on a simulated
2-node cluster, in one run.

Each setup runs the `fescale distill` path (the Feedback-Edit default config, shards and manifest
written to a temporary folder) over the same prompts, with the pools started and one prompt answered
before the clock starts:
- 1 replica: one replica holding both cores (2 torch threads);
- 2 replicas: two replicas of one core (1 thread) each; the pool sends each call to the least busy;
- 2 nodes: a `ray.cluster_utils.Cluster` with two Ray nodes (own raylet and object store each) on
  this machine, 2 logical CPUs each, and 2 replicas that need 1.5 CPUs each, so Ray has to put one on
  each node; rows and model calls cross between the nodes.
All three share this machine's 2 physical cores, so the speedups say what fescale gets out of more
replicas on the same cores, and that a multi-node placement works at the same speed, not how a
larger cluster scales.

    python -m benchmarks.scaling --quick    # 4 prompts, short answers: under 3 minutes here
    python -m benchmarks.scaling            # 8 prompts of the default config
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import ray

from engine.pools import Pools
from benchmarks.record import record
from benchmarks.workload import QUICK, prompts
from engine.config import FescaleConfig, load_config
from engine.runner import execute, init_ray
from engine.sinks import JsonlSink
from engine.summary import Summary, format_table

SETUPS = {
    "1 replica x 2 threads": ["roles.generator.replicas=1", "roles.generator.num_cpus=2", "roles.generator.threads=2"],
    "2 replicas x 1 thread": ["roles.generator.replicas=2", "roles.generator.num_cpus=1", "roles.generator.threads=1"],
    "2 nodes, a replica x 1 thread on each": ["roles.generator.replicas=2", "roles.generator.num_cpus=1.5", "roles.generator.threads=1"],
}
MULTI_NODE = "2 nodes, a replica x 1 thread on each"


def measure(cfg: FescaleConfig, batch, warmup, multi_node: bool) -> dict:
    cluster = None
    if multi_node:
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
        cluster.add_node(num_cpus=2)
        ray.init(address=cluster.address)
    else:
        init_ray(cfg)
    try:
        with Pools(cfg) as pools, tempfile.TemporaryDirectory(prefix="fescale-scaling-") as out:
            nodes = sorted({info["node"] for info in ray.get([r.ready.remote() for group in pools.replicas.values() for r in group])})
            execute(cfg, warmup, JsonlSink(Path(out) / "warmup.jsonl", []), Summary(cfg.mode, ""), pools=pools, progress=False)
            sink = JsonlSink(Path(out) / "run.jsonl", [])
            summary = execute(cfg, batch, sink, Summary(cfg.mode, ""), pools=pools, progress=False)
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
    return {"seconds": summary.wall_s, "prompts": summary.prompts, "failed": summary.failed, "tokens": summary.completion_tokens, "replica_nodes": len(nodes)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="feedback_edit", help="config preset or YAML [feedback_edit]")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--prompts", type=int, help="prompts per setup (the demo prompts, cycled) [8; --quick 4]")
    p.add_argument("--quick", action="store_true", help=f"4 prompts and shorter answers ({', '.join(QUICK)})")
    p.add_argument("--output", default="benchmarks/results/scaling", help="results prefix: .md (appended) and .json")
    args = p.parse_args(argv)

    batch, warmup = prompts(args.prompts or (4 if args.quick else 8)), prompts(1)
    results = {}
    for name, setup in SETUPS.items():
        cfg = load_config(args.config, [*(QUICK if args.quick else []), *args.set, *setup])
        results[name] = measure(cfg, batch, warmup, multi_node=name == MULTI_NODE)
        results[name]["prompts_per_hour"] = 3600 * results[name]["prompts"] / results[name]["seconds"]
    base = results["1 replica x 2 threads"]["prompts_per_hour"]
    rows = [
        (name, str(r["replica_nodes"]), str(r["prompts"]), f"{r['seconds']:.1f}", str(r["tokens"]), f"{r['tokens'] / r['seconds']:.1f}", f"{r['prompts_per_hour']:.0f}", f"{r['prompts_per_hour'] / base:.2f}x")
        for name, r in results.items()
    ]
    headers = ["setup (HF, embedded model)", "nodes used", "prompts", "seconds", "generated tokens", "generated tok/s", "prompts / hour", "vs 1 replica"]
    table = format_table(headers, rows)
    speedup = results["2 replicas x 1 thread"]["prompts_per_hour"] / base
    cfg = load_config(args.config, [*(QUICK if args.quick else []), *args.set])
    note = (
        f"`fescale distill` path, {cfg.mode}: N={cfg.generate.num_responses}, M={cfg.feedback.samples}, K={cfg.edit.edits_per_set}, "
        f"max_tokens {cfg.generate.max_tokens}/{cfg.feedback.max_tokens}/{cfg.edit.max_tokens}; all setups on this machine's 2 cores"
    )
    record(args.output, "benchmarks.scaling", argv, table, note, {"setups": results}, "two_replica_speedup", f"{speedup:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
