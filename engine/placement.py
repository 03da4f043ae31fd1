"""Where each model replica runs: its placement-group bundles, computed from the role config.

One STRICT_PACK placement group per replica (all of a replica's GPUs on one node); nothing else in
fescale creates placement groups. Layouts:
- CPU replica (hf or vllm, num_gpus 0): one bundle {CPU: num_cpus}; vLLM uses its "mp" executor.
- one GPU: {CPU: num_cpus, GPU: 1}; the replica actor holds the GPU.
- vLLM tensor parallel TP > 1: TP bundles of one GPU each; the replica actor takes only CPU on
  bundle 0, and vLLM's Ray executor puts one worker per bundle (child tasks stay in the group).
- openai: no bundles; the replica is an HTTP client that reserves nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from engine.config import RoleConfig
from engine.errors import ConfigError

log = logging.getLogger("fescale")


@dataclass(frozen=True)
class ReplicaPlacement:
    bundles: list[dict[str, float]]  # empty: no placement group (openai client replicas)
    actor_cpus: float
    actor_gpus: float
    executor_backend: str | None  # vLLM's distributed_executor_backend


def plan_replica(role: RoleConfig) -> ReplicaPlacement:
    if role.backend == "openai":
        return ReplicaPlacement([], 0.0, 0.0, None)
    if role.num_gpus == 0:
        return ReplicaPlacement([{"CPU": role.num_cpus}], role.num_cpus, 0.0, "mp" if role.backend == "vllm" else None)
    if role.num_gpus == 1:
        return ReplicaPlacement([{"CPU": role.num_cpus, "GPU": 1.0}], role.num_cpus, 1.0, "uni" if role.backend == "vllm" else None)
    bundles = [{"CPU": role.num_cpus, "GPU": 1.0}] + [{"GPU": 1.0}] * (role.num_gpus - 1)
    return ReplicaPlacement(bundles, role.num_cpus, 0.0, "ray")


def reserved_resources(roles: list[RoleConfig]) -> dict[str, float]:
    """Total CPUs/GPUs the replicas of these (distinct) pools reserve."""
    total: dict[str, float] = {}
    for role in roles:
        for bundle in plan_replica(role).bundles:
            for k, v in bundle.items():
                total[k] = total.get(k, 0.0) + v * role.replicas
    return total


def reserve(placement: ReplicaPlacement, name: str, timeout_s: float, key: str) -> PlacementGroup | None:
    """Create and wait for a replica's placement group; a clear error when the cluster cannot fit it."""
    if not placement.bundles:
        return None
    need = {k: sum(b.get(k, 0.0) for b in placement.bundles) for k in ("CPU", "GPU")}
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if not any(all(node.get(k, 0.0) >= v for k, v in need.items() if v) for node in nodes):
        raise ConfigError(
            f"cannot place {name}: it needs {need['CPU']:g} CPUs and {need['GPU']:g} GPUs on one node, and no node of "
            f"the cluster has that ({[{k: n.get(k, 0) for k in ('CPU', 'GPU')} for n in nodes]}); lower "
            f"`{key}.num_cpus` or `{key}.num_gpus`, or add a bigger node"
        )
    pg = placement_group(placement.bundles, strategy="STRICT_PACK", name=name)
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise ConfigError(
            f"cannot place {name}: it needs {placement.bundles} on one node, the cluster has "
            f"{ray.available_resources()} available of {ray.cluster_resources()}; lower "
            f"`{key}.num_cpus`, `{key}.num_gpus` or `{key}.replicas`, or add nodes"
        ) from None
    return pg


def actor_options(placement: ReplicaPlacement, pg: PlacementGroup | None) -> dict:
    options: dict = {"num_cpus": placement.actor_cpus, "num_gpus": placement.actor_gpus}
    if pg is not None:
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True
        )
    return options
