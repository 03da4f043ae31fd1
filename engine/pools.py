"""Role pools from a config: reserve each replica's placement group, start the replicas, hand out clients.

The plan (which pools, what each replica loads, its bundles) is `engine.placement.plan_pools`; the
runtime pieces (replica actors, the events actor, `PoolClient`) are `actors.replica` and
`actors.client`. This module puts them together for a config, and is the only one that does.

Example:
    >>> cfg = load_config("greedy")
    >>> with Pools(cfg) as pools:
    ...     client = pools.client("generator")
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Callable, Iterable

import ray

from actors.client import PoolClient, RetryPolicy
from actors.errors import BackendError, ConfigError, RequestError, last_line
from actors.replica import REPLICA_ENV, ModelReplica, PoolEvents
from engine.config import FescaleConfig, RoleConfig, build_config
from engine.placement import PoolKey, actor_options, check_models, plan_pools, pool_key, reserve
from engine.planner import check_cluster

log = logging.getLogger("fescale")


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


class Pools:
    """Starts the pools of a config's modes, hands out their clients, and shuts everything down.

    `layouts` is the plan by pool name; `replicas` the running replica handles by pool name.
    """

    def __init__(self, cfg: FescaleConfig, modes: Iterable[str] | None = None, roles: Iterable[str] | None = None):
        """`roles`: start only the pools serving these roles (`fescale score` needs the reward model alone)."""
        self.cfg = cfg
        wanted = None if roles is None else set(roles)
        self.layouts = {name: p for name, p in plan_pools(cfg, modes).items() if wanted is None or wanted & set(p.roles)}
        self.replicas: dict[str, list] = {name: [] for name in self.layouts}
        self.groups: dict[str, list] = {name: [] for name in self.layouts}
        self.events = None
        p = cfg.pipeline
        self.policy = RetryPolicy(p.max_attempts, p.call_timeout_s, p.ready_timeout_s)

    def __enter__(self) -> "Pools":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def start(self) -> None:
        """Reserve, start and wait for every replica; on any failure release what was started."""
        check_models(self.cfg, pools=self.layouts.values())  # fail on a bad path before reserving anything
        if any(p.role.num_gpus for p in self.layouts.values()):  # and on a cluster the replicas cannot fit
            check_cluster(self.cfg, self.layouts.values())
        try:
            self._start()
        except BaseException:
            self.shutdown()
            raise

    def _start(self) -> None:
        timeout = self.cfg.pipeline.ready_timeout_s
        started = time.monotonic()
        events_name = f"fescale-events-{uuid.uuid4().hex}"
        self.events = PoolEvents.options(name=events_name).remote()
        for name, pool in self.layouts.items():
            key = f"roles.{pool.roles[0]}"
            env = {**REPLICA_ENV, **pool.role.env}
            for i in range(pool.role.replicas):
                pg = reserve(pool.placement, f"fescale-{name}-{i}", timeout, key)
                self.groups[name].append(pg)
                options = actor_options(pool.placement, pg)
                # Ray restarts it without limit; the budget per window is the events actor's (`PoolEvents.starting`).
                replica = ModelReplica.options(**options, max_restarts=-1, max_task_retries=0, runtime_env={"env_vars": env}).remote(
                    pool.spec, events_name, (pool.role.max_restarts, pool.role.restart_window_s)
                )
                self.replicas[name].append(replica)
        for name, pool in self.layouts.items():
            try:
                infos = ray.get([r.ready.remote() for r in self.replicas[name]], timeout=timeout)
            except ray.exceptions.GetTimeoutError:
                raise ConfigError(f"pool {name} did not load within pipeline.ready_timeout_s={timeout}") from None
            except ray.exceptions.RayActorError as e:
                raise BackendError(f"pool {name} (roles {', '.join(pool.roles)}) failed to start: {last_line(e)}") from None
            log.info(
                "pool %s (roles %s): %d replica(s) ready after %.1fs: %s",
                name, ", ".join(pool.roles), len(infos), time.monotonic() - started, infos[0],
            )

    def clients(self) -> PoolClients:
        return PoolClients({p.key: PoolClient(name, self.replicas[name], self.events, self.policy) for name, p in self.layouts.items()})

    def client(self, role_name: str) -> PoolClient:
        """The client of the pool serving one of the config's roles."""
        return self.clients().for_config(self.cfg)(role_name)

    def fault_counts(self) -> dict[str, int]:
        """Replica restarts and retried calls so far, across every process using these pools."""
        return ray.get(self.events.snapshot.remote(), timeout=30) if self.events is not None else {"restarts": 0, "retries": 0}

    async def health(self, timeout_s: float = 2.0) -> dict[str, dict]:
        """Per pool: replicas, how many answer `ready` now (fewer while one restarts), their PIDs, and
        the callers' calls they stopped because the caller was gone (since each replica's last start)."""

        async def probe(replica) -> dict | None:
            try:
                if not await self.events.is_up.remote(replica._actor_id.hex()):
                    return None  # (re)loading its model
                return await asyncio.wait_for(replica.ready.remote(), timeout_s)
            except (ray.exceptions.RayActorError, asyncio.TimeoutError):
                return None

        report = {}
        for name, replicas in self.replicas.items():
            infos = [info for info in await asyncio.gather(*(probe(r) for r in replicas)) if info is not None]
            pids, cancelled = [i["pid"] for i in infos], sum(i["cancelled"] for i in infos)
            report[name] = {"replicas": len(replicas), "ready": len(pids), "pids": pids, "cancelled": cancelled}
        return report

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for name in self.layouts:
            closing = [r.close.remote() for r in self.replicas[name]]
            try:
                ray.get(closing, timeout=30)
            except Exception:  # a replica that cannot close cleanly is killed below anyway
                pass
            for replica in self.replicas[name]:
                ray.kill(replica)
            for pg in self.groups[name]:
                if pg is not None:
                    remove_placement_group(pg)
            self.replicas[name].clear()
            self.groups[name].clear()
        if self.events is not None:
            ray.kill(self.events)
            self.events = None


def role_pools(role: RoleConfig, seed: int = 0) -> Pools:
    """Pools for one model outside the method (a trainer's rollouts, a data check): the model of
    `role` as the generator of a greedy config. Call `client("generator")` once started."""
    return Pools(build_config({"mode": "greedy", "seed": seed, "roles": {"generator": role.model_dump()}}, "a one-role pool"))
