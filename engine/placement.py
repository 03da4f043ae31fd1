"""The pool plan: which pools a config needs (roles sharing a model share one), what each replica
serves (`BackendSpec`) and where it runs (its placement-group bundles), from the config alone.

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
import os
from dataclasses import dataclass
from typing import Iterable

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.backend import BackendSpec
from actors.models import resolve_model
from engine.config import FescaleConfig, RoleConfig
from actors.errors import ConfigError

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


PoolKey = tuple


def pool_key(cfg: FescaleConfig, role_name: str, role: RoleConfig) -> PoolKey:
    """What makes two roles one pool: same backend, model, model kind and endpoint."""
    return (role.backend, role.model, cfg.role_kind(role_name), role.endpoint.base_url if role.endpoint else None)


@dataclass
class PoolLayout:
    """One pool as planned: the roles it serves, what each replica loads and where it is placed."""

    key: PoolKey
    name: str
    role: RoleConfig
    spec: BackendSpec
    placement: ReplicaPlacement
    roles: list[str]


def plan_pools(cfg: FescaleConfig, modes: Iterable[str] | None = None) -> dict[str, PoolLayout]:
    """One pool per distinct `pool_key` among the roles the modes (default: the config's) call, by name."""
    pools: dict[PoolKey, PoolLayout] = {}
    roles = [(name, role) for mode in (modes or [cfg.mode]) for name, role in cfg.active_roles(mode).items()]
    for role_name, role in roles:
        kind = cfg.role_kind(role_name)
        key = pool_key(cfg, role_name, role)
        if key in pools:
            pool = pools[key]
            if pool.role != role:
                other = pool.roles[0]
                diff = [k for k in RoleConfig.model_fields if getattr(pool.role, k) != getattr(role, k)]
                raise ConfigError(
                    f"roles.{role_name} and roles.{other} share model {role.model!r} on backend {role.backend} "
                    f"(one pool) but differ in {', '.join(diff)}; give them the same settings"
                )
            if role_name not in pool.roles:
                pool.roles.append(role_name)
            continue
        placement = plan_replica(role)
        name = f"{role.backend}:{os.path.basename(role.model.rstrip('/'))}" + (":classifier" if kind == "classifier" else "")
        if any(p.name == name for p in pools.values()):  # same folder name, different paths
            name += f"#{len(pools)}"
        spec = BackendSpec(
            backend=role.backend,
            model=role.model,
            kind=kind,
            score_token_id=cfg.select.token_id,
            seed=cfg.seed,
            num_gpus=role.num_gpus,
            threads=role.torch_threads,
            batch_size=role.batch_size,
            max_model_len=role.max_model_len,
            engine_kwargs=role.engine_kwargs,
            endpoint=role.endpoint.model_dump() if role.endpoint else None,
            executor_backend=placement.executor_backend,
        )
        pools[key] = PoolLayout(key=key, name=name, role=role, spec=spec, placement=placement, roles=[role_name])
    return {p.name: p for p in pools.values()}


def check_models(cfg: FescaleConfig, modes: Iterable[str] | None = None, pools: Iterable[PoolLayout] | None = None) -> None:
    """A `ConfigError` naming the key of the first local model path that does not exist."""
    for pool in pools if pools is not None else plan_pools(cfg, modes).values():
        if pool.role.backend != "openai":
            resolve_model(pool.role.model, key=f"roles.{pool.roles[0]}.model")
