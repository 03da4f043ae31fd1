"""Role pools: long-lived model replicas (Ray actors) shared by every stage and request.

Roles that name the same model, backend and model kind share one pool, so a model is never loaded
twice (the embedded default runs all four roles on one SmolLM2 pool). A `PoolClient` is the
picklable handle stages and the Serve app use: it sends each call to the replica with the fewest
calls in flight from this client.

Example:
    >>> cfg = load_config("greedy")
    >>> with Pools(cfg) as pools:
    ...     client = pools.clients().for_config(cfg)("generator")
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import ray

from actors.backend import BackendSpec, ChatRequest, ChatResult, ClassifyRequest, NextTokenRequest, ScoreResult, make_backend
from actors.models import resolve_model
from engine.config import FescaleConfig, RoleConfig
from engine.errors import BackendError, ConfigError, FescaleError, RequestError
from engine.placement import ReplicaPlacement, actor_options, plan_replica, reserve

log = logging.getLogger("fescale")

# Replica processes never reach a hub and keep their logs to what matters.
REPLICA_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_LOGGING_LEVEL": "WARNING",
    "VLLM_CONFIGURE_LOGGING": "1",
}


@ray.remote
class ModelReplica:
    """One model behind one backend. Async: it accepts calls while the model works."""

    def __init__(self, spec: BackendSpec):
        self.backend = make_backend(spec)

    def ready(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), **self.backend.info()}

    async def chat(self, requests: list[ChatRequest]) -> list[ChatResult]:
        return await self.backend.chat(requests)

    async def next_token_logprobs(self, requests: list[NextTokenRequest]) -> list[ScoreResult]:
        return await self.backend.next_token_logprobs(requests)

    async def classify(self, requests: list[ClassifyRequest]) -> list[ScoreResult]:
        return await self.backend.classify(requests)

    async def close(self) -> None:
        await self.backend.close()


class PoolClient:
    """Calls one pool's replicas; the least busy (from this client's view) gets each call."""

    def __init__(self, name: str, replicas: list):
        self.name = name
        self.replicas = replicas
        self._in_flight = [0] * len(replicas)

    def __reduce__(self):  # in-flight counts are per process: a copy starts from zero
        return (PoolClient, (self.name, self.replicas))

    async def chat(self, requests: list[ChatRequest]) -> list[ChatResult]:
        return await self._call("chat", requests)

    async def next_token_logprobs(self, requests: list[NextTokenRequest]) -> list[ScoreResult]:
        return await self._call("next_token_logprobs", requests)

    async def classify(self, requests: list[ClassifyRequest]) -> list[ScoreResult]:
        return await self._call("classify", requests)

    async def _call(self, method: str, requests: list) -> list:
        if not requests:
            return []
        i = min(range(len(self.replicas)), key=self._in_flight.__getitem__)
        self._in_flight[i] += 1
        try:
            return await getattr(self.replicas[i], method).remote(requests)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, FescaleError):  # the replica's own error, without Ray's traceback wrapping
                raise e.cause from None
            raise
        finally:
            self._in_flight[i] -= 1


PoolKey = tuple


def pool_key(cfg: FescaleConfig, role_name: str, role: RoleConfig) -> PoolKey:
    """What makes two roles one pool: same backend, model, model kind and endpoint."""
    return (role.backend, role.model, cfg.role_kind(role_name), role.endpoint.base_url if role.endpoint else None)


class PoolClients:
    """The clients of running pools by pool key; picklable, so the Serve app's ingress gets a copy.

    `for_config` resolves roles for any config whose roles run in these pools, which is how a Serve
    request switches mode or knobs without loading anything.
    """

    def __init__(self, by_key: dict[PoolKey, PoolClient]):
        self.by_key = by_key

    def for_config(self, cfg: FescaleConfig) -> Callable[[str], PoolClient]:
        active = cfg.active_roles()

        def client(role_name: str) -> PoolClient:
            role = active[role_name]
            key = pool_key(cfg, role_name, role)
            if key not in self.by_key:
                raise RequestError(
                    f"mode {cfg.mode} needs roles.{role_name} (model {role.model!r} on {role.backend}), "
                    "which is not loaded here; add the mode to serve.modes"
                )
            return self.by_key[key]

        return client


@dataclass
class Pool:
    key: PoolKey
    name: str
    role: RoleConfig
    spec: BackendSpec
    placement: ReplicaPlacement
    roles: list[str]
    replicas: list = field(default_factory=list)
    groups: list = field(default_factory=list)


def plan_pools(cfg: FescaleConfig, modes: Iterable[str] | None = None) -> dict[str, Pool]:
    """One pool per distinct `pool_key` among the roles the modes (default: the config's) call, by name."""
    pools: dict[PoolKey, Pool] = {}
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
            seed=cfg.seed,
            num_gpus=role.num_gpus,
            threads=role.torch_threads,
            batch_size=role.batch_size,
            max_model_len=role.max_model_len,
            engine_kwargs=role.engine_kwargs,
            endpoint=role.endpoint.model_dump() if role.endpoint else None,
            executor_backend=placement.executor_backend,
        )
        pools[key] = Pool(key=key, name=name, role=role, spec=spec, placement=placement, roles=[role_name])
    return {p.name: p for p in pools.values()}


class Pools:
    """Starts the pools of a config's modes, hands out their clients, and shuts everything down."""

    def __init__(self, cfg: FescaleConfig, modes: Iterable[str] | None = None):
        self.cfg = cfg
        self.pools = plan_pools(cfg, modes)

    def __enter__(self) -> "Pools":
        try:
            self.start()
        except BaseException:
            self.shutdown()  # a later pool failed: release the replicas already started
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def start(self) -> None:
        check_models(self.cfg, pools=self.pools.values())  # fail on a bad path before reserving anything
        timeout = self.cfg.pipeline.ready_timeout_s
        started = time.monotonic()
        for pool in self.pools.values():
            key = f"roles.{pool.roles[0]}"
            env = {**REPLICA_ENV, **pool.role.env}
            for i in range(pool.role.replicas):
                pg = reserve(pool.placement, f"fescale-{pool.name}-{i}", timeout, key)
                pool.groups.append(pg)
                options = actor_options(pool.placement, pg)
                replica = ModelReplica.options(**options, runtime_env={"env_vars": env}).remote(pool.spec)
                pool.replicas.append(replica)
        for pool in self.pools.values():
            try:
                infos = ray.get([r.ready.remote() for r in pool.replicas], timeout=timeout)
            except ray.exceptions.GetTimeoutError:
                raise ConfigError(f"pool {pool.name} did not load within pipeline.ready_timeout_s={timeout}") from None
            except ray.exceptions.RayActorError as e:
                raise BackendError(f"pool {pool.name} (roles {', '.join(pool.roles)}) failed to start: {_cause(e)}") from None
            log.info(
                "pool %s (roles %s): %d replica(s) ready after %.1fs: %s",
                pool.name, ", ".join(pool.roles), len(infos), time.monotonic() - started, infos[0],
            )

    def clients(self) -> PoolClients:
        return PoolClients({p.key: PoolClient(p.name, p.replicas) for p in self.pools.values()})

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for pool in self.pools.values():
            closing = [r.close.remote() for r in pool.replicas]
            try:
                ray.get(closing, timeout=30)
            except Exception:  # a replica that cannot close cleanly is killed below anyway
                pass
            for replica in pool.replicas:
                ray.kill(replica)
            for pg in pool.groups:
                if pg is not None:
                    remove_placement_group(pg)
            pool.replicas.clear()
            pool.groups.clear()


def check_models(cfg: FescaleConfig, modes: Iterable[str] | None = None, pools: Iterable[Pool] | None = None) -> None:
    """A `ConfigError` naming the key of the first local model path that does not exist."""
    for pool in pools if pools is not None else plan_pools(cfg, modes).values():
        if pool.role.backend != "openai":
            resolve_model(pool.role.model, key=f"roles.{pool.roles[0]}.model")


def _cause(error: Exception) -> str:
    """The last line of a replica's failure (its own exception message, without Ray's wrapping)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
