"""Does a config fit a cluster? Memory per GPU and placement groups per node, before any actor starts.

`fescale plan --config C --cluster SPEC` prints, for every pool (roles sharing a model share one,
as when running): its placement groups (`engine.placement.plan_replica`: one STRICT_PACK group per
replica, all of a replica's GPUs on one node), the weights and KV cache per GPU from the model's
config.json at its tensor-parallel size, and which node each replica and Ray Data stage actor lands
on; then whether it fits, or every reason it does not with what to change.

The engine runs the same check before it reserves anything, against the nodes Ray reports: a batch
job with its stage actors (a cluster whose CPUs the replicas take would leave the stream waiting
forever), the pools alone when a config declares GPUs. Ray does not know GPU memory, so there the
memory columns are computed but only `fescale plan --cluster` checks them.

Memory per GPU of a replica (decimal GB, 1 GB = 1e9 bytes):
- weights = parameters x bytes of the dtype / TP;
- room for the KV cache = gpu_memory_utilization x GPU memory - weights - a runtime reserve
  (`RUNTIME_RESERVE_GB`: CUDA context, NCCL buffers, CUDA graphs and the activation peak vLLM
  profiles; an estimate, not measured on this CPU-only machine); HF does not preallocate, so it may
  use the whole GPU;
- KV per token = 2 x layers x KV heads per GPU x head size x bytes of the KV dtype; the engine must
  hold at least one sequence of max_model_len tokens (vLLM refuses to start otherwise).
A GPU taken as "80GB" is 80e9 bytes, a little under the 85.5e9 an H100 80GB reports: the plan errs
on the safe side.

Example:
    $ fescale plan --config paper_70b --cluster 4x8xH100-80GB
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from actors.vllm_backend import engine_args
from engine.config import CONFIGS_DIR, FescaleConfig
from engine.placement import PoolLayout
from actors.errors import ConfigError
from engine.model_memory import GB, ModelFacts, dtype_bytes, load_facts
from engine.summary import format_table

log = logging.getLogger("fescale")
REPO = CONFIGS_DIR.parent

RUNTIME_RESERVE_GB = 3.0
VLLM_GPU_MEMORY_UTILIZATION = 0.92  # vLLM's own default (CacheConfig, vLLM 0.32)
DEFAULT_CPUS_PER_GPU = 8
LIVE_CLUSTER = "the Ray cluster"  # a ClusterSpec read from Ray, not written with --cluster
CLUSTER_HELP = (
    "NODESxGPUSxNAME-MEMGB[,cpu:N] (e.g. 2x8xH100-80GB, 4x8xH100-80GB,cpu:96, 1xL4-24GB for one node "
    f"with one L4) or [NODESx]cpu:N for CPU-only nodes (cpu:2); GPU nodes have {DEFAULT_CPUS_PER_GPU} CPUs per GPU unless ,cpu:N says"
)
_GPU_SPEC = re.compile(r"^(?:(\d+)x)?(\d+)x([A-Za-z][\w.]*)-(\d+(?:\.\d+)?)GB(?:,cpu:(\d+(?:\.\d+)?))?$", re.IGNORECASE)
_CPU_SPEC = re.compile(r"^(?:(\d+)x)?cpu:(\d+(?:\.\d+)?)$", re.IGNORECASE)


@dataclass(frozen=True)
class NodeSpec:
    cpus: float
    gpus: int = 0
    gpu_name: str = ""
    gpu_memory_gb: float | None = None  # None: not known (a live Ray cluster does not report it)


@dataclass(frozen=True)
class ClusterSpec:
    nodes: tuple[NodeSpec, ...]
    text: str  # as given, or "the Ray cluster"

    @property
    def homogeneous(self) -> bool:
        return len(set(self.nodes)) == 1

    def describe(self) -> str:
        kinds = Counter(self.nodes)
        parts = []
        for node, count in kinds.items():
            gpus = f"{node.gpus} x {node.gpu_name or 'GPU'}" + (f" ({node.gpu_memory_gb:g} GB)" if node.gpu_memory_gb else "")
            parts.append(f"{count} node{'s' * (count > 1)} of " + (f"{gpus}, " if node.gpus else "") + f"{node.cpus:g} CPUs")
        return "; ".join(parts)


def parse_cluster(text: str) -> ClusterSpec:
    """A cluster from its short description (`CLUSTER_HELP`); every node alike."""
    spec = text.strip()
    if m := _GPU_SPEC.match(spec):
        nodes, gpus, name, memory, cpus = m.groups()
        node = NodeSpec(float(cpus) if cpus else DEFAULT_CPUS_PER_GPU * int(gpus), int(gpus), name, float(memory))
    elif m := _CPU_SPEC.match(spec):
        nodes, cpus = m.groups()
        node = NodeSpec(float(cpus))
    else:
        raise ConfigError(f"--cluster {text!r} is not a cluster description; write {CLUSTER_HELP}")
    count = int(nodes or 1)
    if count < 1 or node.cpus <= 0 or (m.re is _GPU_SPEC and node.gpus < 1):
        raise ConfigError(f"--cluster {text!r} has no nodes, GPUs or CPUs; counts start at 1")
    return ClusterSpec(tuple([node] * count), text)


def cluster_from_ray() -> ClusterSpec:
    """The live Ray cluster's nodes: their CPUs and GPUs (not GPU memory, which Ray does not know)."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    return ClusterSpec(tuple(NodeSpec(r.get("CPU", 0.0), int(r.get("GPU", 0))) for r in nodes), LIVE_CLUSTER)


@dataclass(frozen=True)
class Memory:
    """One GPU of a replica (host memory for a CPU replica: weights only)."""

    dtype: str
    weights_gb: float
    kv_dtype: str
    kv_bytes_per_token: int
    max_model_len: int
    utilization: float  # the share of a GPU the engine may use
    gpu_memory_gb: float | None  # None: no GPU, or its memory unknown

    @property
    def kv_room_gb(self) -> float | None:
        if self.gpu_memory_gb is None:
            return None
        return self.utilization * self.gpu_memory_gb - self.weights_gb - RUNTIME_RESERVE_GB

    @property
    def kv_per_sequence_gb(self) -> float:
        return self.kv_bytes_per_token * self.max_model_len / GB

    @property
    def full_length_sequences(self) -> int | None:
        """Sequences of max_model_len tokens the KV room holds at once."""
        return None if self.kv_room_gb is None else max(0, math.floor(self.kv_room_gb / self.kv_per_sequence_gb))


@dataclass(frozen=True)
class Item:
    """Something that needs CPUs and GPUs on one node: a replica's placement group or a stage actor."""

    label: str
    key: str  # the config section whose settings size it
    cpus: float
    gpus: int


@dataclass
class PoolPlan:
    name: str
    roles: list[str]
    key: str  # the config key to change, e.g. roles.generator
    backend: str
    replicas: int
    tp: int
    bundles: list[dict[str, float]]
    facts: ModelFacts | None  # None: an openai client (nothing to load)
    memory: Memory | None

    @property
    def item(self) -> Item:
        return Item(self.name, self.key, sum(b.get("CPU", 0.0) for b in self.bundles), int(sum(b.get("GPU", 0.0) for b in self.bundles)))


@dataclass
class ClusterPlan:
    """The outcome: pools, where each item lands, and every problem (empty: it fits)."""

    cluster: ClusterSpec
    pools: list[PoolPlan]
    nodes: list[list[Item]]
    problems: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.problems

    def table(self) -> str:
        pools = format_table(
            ["pool", "roles", "replicas", "placement group per replica (STRICT_PACK)", "model facts"],
            [(p.name, ", ".join(p.roles), str(p.replicas), _bundles(p.bundles), _shown(p.facts.source) if p.facts else "-") for p in self.pools],
        )
        memory = format_table(
            ["pool", "params", "dtype", "TP", "weights/GPU", "KV/token/GPU", "max_model_len", "KV per sequence", "KV room/GPU", "full-length sequences"],
            [_memory_row(p) for p in self.pools if p.memory],
        )
        nodes = format_table(
            ["node", "holds", "GPUs", "CPUs"],
            [(str(k), _holds(items), f"{sum(i.gpus for i in items)}/{node.gpus}", f"{sum(i.cpus for i in items):g}/{node.cpus:g}")
             for k, (node, items) in enumerate(zip(self.cluster.nodes, self.nodes))],
        )  # fmt: skip
        reserve = f"KV room = gpu_memory_utilization x GPU memory - weights - {RUNTIME_RESERVE_GB:g} GB runtime reserve; GB = 1e9 bytes"
        return f"Pools and placement groups\n\n{pools}\n\nMemory per GPU, host memory for CPU replicas ({reserve})\n\n{memory}\n\nNodes\n\n{nodes}"

    def verdict(self) -> str:
        if not self.fits:
            return f"does not fit {self.cluster.text}:\n  - " + "\n  - ".join(self.problems)
        gpus = sum(i.gpus for items in self.nodes for i in items)
        used = sum(1 for items in self.nodes if items)
        return f"fits {self.cluster.text}: {gpus} of {sum(n.gpus for n in self.cluster.nodes)} GPUs on {used} of {len(self.nodes)} nodes"


def plan_cluster(
    cfg: FescaleConfig, pools: Iterable[PoolLayout], cluster: ClusterSpec, stage_actors: int = 0, need_facts: bool = True
) -> ClusterPlan:
    """Size every pool for the cluster's GPUs, pack the replicas' groups (and `stage_actors` Ray Data
    actors) onto its nodes, and collect every problem with what to change. Without `need_facts`, a
    model whose config.json the planner cannot read is placed without sizing (the engine runs what
    its backend can load)."""
    plans = [_plan_pool(pool, _gpu_memory(cluster), need_facts) for pool in pools]
    problems = [problem for plan in plans for problem in _memory_problems(plan)]
    items = [plan.item for plan in plans if plan.bundles for _ in range(plan.replicas)]
    items += [Item("stage actor", "pipeline", cfg.pipeline.stage_num_cpus, 0)] * stage_actors
    too_big = list(dict.fromkeys(i for i in items if not any(n.gpus >= i.gpus and n.cpus + 1e-9 >= i.cpus for n in cluster.nodes)))
    for item in too_big:
        what = "one replica" if item.key.startswith("roles.") else "one stage actor"
        problems.append(
            f"{item.key}: {what} needs {item.gpus} GPUs and {item.cpus:g} CPUs on one node, and no node has them "
            f"({cluster.describe()}); lower {item.key}.num_gpus / num_cpus (and raise replicas), or use bigger nodes"
            if item.gpus else f"{item.key}: {what} needs {item.cpus:g} CPUs on one node ({cluster.describe()}); lower {item.key}.stage_num_cpus"
        )
    fitting = [i for i in items if i not in too_big]
    nodes, unplaced = _pack(fitting, cluster.nodes)
    if unplaced:
        labels = ", ".join(f"{n} x {label}" for label, n in Counter(i.label for i in unplaced).items())
        fix = "add nodes"
        if cluster.homogeneous and cluster.text != LIVE_CLUSTER:
            needed = sum(1 for held in _pack(fitting, cluster.nodes[:1] * len(fitting))[0] if held)
            fix = f"use {needed} such nodes (--cluster {_with_nodes(cluster.text, needed)})"
        replicas = {p.key: p.replicas for p in plans}
        # CPU-only items that found no room: the replicas' CPUs are what crowds them out
        crowding = [i for held in nodes for i in held if i.key.startswith("roles.")] if not any(i.gpus for i in unplaced) else []
        keys = sorted({_smaller(i, replicas.get(i.key, 1)) for i in [*unplaced, *crowding]})
        problems.append(f"no room left for {labels} ({cluster.describe()}); {fix}, or lower {' / '.join(keys)}")
    return ClusterPlan(cluster, plans, nodes, problems)


def check_cluster(cfg: FescaleConfig, pools: Iterable[PoolLayout], stage_actors: int = 0) -> None:
    """The engine's check before it reserves anything: a `ConfigError` listing why the pools (and a
    stream's `stage_actors`) cannot run on the live Ray cluster (no node big enough for a replica, not
    enough nodes or CPUs left for the stages, a TP size the model's heads do not split into), instead
    of a job that waits forever for resources a replica holds."""
    plan = plan_cluster(cfg, pools, cluster_from_ray(), stage_actors, need_facts=False)
    if not plan.fits:
        raise ConfigError(plan.verdict())
    log.info("placement check: %s (GPU memory is checked by `fescale plan --cluster`)", plan.verdict())


# -- pieces -------------------------------------------------------------------------------------


def _gpu_memory(cluster: ClusterSpec) -> float | None:
    """The smallest GPU memory of the GPU nodes (a replica may land on any), None when unknown."""
    known = [n.gpu_memory_gb for n in cluster.nodes if n.gpus]
    return min(known) if known and None not in known else None


def _plan_pool(pool: PoolLayout, gpu_memory_gb: float | None, need_facts: bool) -> PoolPlan:
    role, key = pool.role, f"roles.{pool.roles[0]}"
    tp = max(1, role.num_gpus)
    facts = memory = None
    if role.backend != "openai":
        try:
            facts = load_facts(role.model, f"{key}.model")
            memory = _memory(pool, facts, key, gpu_memory_gb)
        except ConfigError as e:
            if need_facts:
                raise
            log.warning("placement check: %s is placed without sizing its memory: %s", key, e)
            facts = None
    return PoolPlan(pool.name, pool.roles, key, role.backend, role.replicas, tp, pool.placement.bundles, facts, memory)


def _memory(pool: PoolLayout, facts: ModelFacts, key: str, gpu_memory_gb: float | None) -> Memory:
    """The engine's own settings decide: vLLM's engine arguments as fescale builds them, or HF's
    `from_pretrained` dtype (float32 on CPU, else the checkpoint's)."""
    role = pool.role
    if role.backend == "vllm":
        args = engine_args(pool.spec, role.model)
        dtype = str(args.get("dtype", "auto"))
        if dtype == "auto":  # vLLM runs a float32 checkpoint in 16 bits on a GPU
            dtype = "bfloat16" if facts.dtype == "float32" else facts.dtype
        kv_dtype = str(args.get("kv_cache_dtype", "auto"))
        max_len = args.get("max_model_len") or facts.max_position_embeddings
        utilization = args.get("gpu_memory_utilization", VLLM_GPU_MEMORY_UTILIZATION)
    else:
        dtype = str(role.engine_kwargs.get("dtype") or ("auto" if role.num_gpus else "float32"))
        dtype = facts.dtype if dtype == "auto" else dtype
        kv_dtype, max_len, utilization = "auto", role.max_model_len or facts.max_position_embeddings or 2048, 1.0
    kv_dtype = dtype if kv_dtype == "auto" else kv_dtype
    dtype_bytes(dtype, f"{key}.engine_kwargs.dtype")
    dtype_bytes(kv_dtype, f"{key}.engine_kwargs.kv_cache_dtype")
    tp = max(1, role.num_gpus)
    weights = facts.weight_bytes_per_gpu(dtype, tp) / GB
    gpu_memory_gb = gpu_memory_gb if role.num_gpus else None
    return Memory(dtype, weights, kv_dtype, facts.kv_bytes_per_token(kv_dtype, tp), int(max_len), utilization, gpu_memory_gb)


def _memory_problems(plan: PoolPlan) -> list[str]:
    if not plan.facts:
        return []
    problems = []
    if plan.backend == "vllm" and (why := plan.facts.tp_problem(plan.tp)):
        problems.append(f"{plan.key}: {why}")
    m = plan.memory
    if m is None or m.kv_room_gb is None:
        return problems
    if m.kv_room_gb <= 0:
        headroom = m.weights_gb + RUNTIME_RESERVE_GB < 0.95 * m.gpu_memory_gb and plan.backend == "vllm"
        problems.append(
            f"{plan.key}: weights of {m.weights_gb:.1f} GB per GPU (TP {plan.tp}, {m.dtype}) + {RUNTIME_RESERVE_GB:g} GB reserve "
            f"exceed {m.utilization:g} x {m.gpu_memory_gb:g} GB; raise {plan.key}.num_gpus (tensor parallelism) or use GPUs with more memory"
            + (f", or raise {plan.key}.engine_kwargs.gpu_memory_utilization" if headroom else "")
        )
    elif m.full_length_sequences < 1:
        tokens = int(m.kv_room_gb * GB / m.kv_bytes_per_token)
        problems.append(
            f"{plan.key}: {m.kv_room_gb:.1f} GB per GPU are left for the KV cache ({m.utilization:g} x {m.gpu_memory_gb:g} GB "
            f"- {m.weights_gb:.1f} GB weights - {RUNTIME_RESERVE_GB:g} GB reserve), {tokens} tokens: less than one sequence of "
            f"max_model_len={m.max_model_len}; lower max_model_len to {tokens} or below, or raise {plan.key}.num_gpus"
        )
    return problems


def _pack(items: list[Item], nodes: Iterable[NodeSpec]) -> tuple[list[list[Item]], list[Item]]:
    """First fit, biggest first (GPUs, then CPUs): where each item lands, and what is left over."""
    nodes = list(nodes)
    free = [[n.gpus, n.cpus] for n in nodes]
    placed: list[list[Item]] = [[] for _ in nodes]
    unplaced = []
    for item in sorted(items, key=lambda i: (-i.gpus, -i.cpus)):
        k = next((k for k, (g, c) in enumerate(free) if g >= item.gpus and c + 1e-9 >= item.cpus), None)
        if k is None:
            unplaced.append(item)
            continue
        free[k][0] -= item.gpus
        free[k][1] -= item.cpus
        placed[k].append(item)
    return placed, unplaced


def _smaller(item: Item, replicas: int) -> str:
    """The setting that shrinks an item: a pool's replicas, else its GPUs or CPUs; the stage actors'."""
    if not item.key.startswith("roles."):
        return "pipeline.stage_actors / pipeline.stage_num_cpus"
    return f"{item.key}.replicas" if replicas > 1 else f"{item.key}.{'num_gpus' if item.gpus else 'num_cpus'}"


def _with_nodes(text: str, count: int) -> str:
    return re.sub(r"^(\d+x)?(?=\d+x|cpu:)", f"{count}x", text.strip(), count=1, flags=re.IGNORECASE)


def _bundles(bundles: list[dict[str, float]]) -> str:
    if not bundles:
        return "none (an HTTP client)"
    shown = [", ".join(f"{k}: {v:g}" for k, v in b.items()) for b in bundles]
    runs: list[list] = []
    for s in shown:
        if runs and runs[-1][0] == s:
            runs[-1][1] += 1
        else:
            runs.append([s, 1])
    return " + ".join(("" if n == 1 else f"{n} x ") + "{" + s + "}" for s, n in runs)


def _memory_row(p: PoolPlan) -> tuple[str, ...]:
    m = p.memory
    gpu = any("GPU" in b for b in p.bundles)
    room = "-" if m.kv_room_gb is None else f"{m.kv_room_gb:.1f} GB"
    seqs = "-" if m.full_length_sequences is None else str(m.full_length_sequences)
    return (
        p.name, f"{p.facts.num_params / 1e9:.2f} B", m.dtype, str(p.tp) if gpu else "cpu", f"{m.weights_gb:.2f} GB",
        f"{m.kv_bytes_per_token / 1024:g} KiB", str(m.max_model_len), f"{m.kv_per_sequence_gb:.3f} GB", room, seqs,
    )  # fmt: skip


def _shown(path: str) -> str:
    """A config.json path relative to the repository (the shipped facts) or the home folder."""
    p = Path(path)
    for base, prefix in ((REPO, ""), (Path.home(), "~/")):
        if p.is_relative_to(base):
            return prefix + str(p.relative_to(base))
    return path


def _holds(items: list[Item]) -> str:
    return ", ".join(f"{n} x {label}" if n > 1 else label for label, n in Counter(i.label for i in items).items()) or "-"
