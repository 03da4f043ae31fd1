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

import asyncio
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import ray

from actors.backend import BackendSpec, ChatRequest, ChatResult, ClassifyRequest, NextTokenRequest, ScoreResult, make_backend
from actors.models import resolve_model
from engine.config import FescaleConfig, RoleConfig
from engine.errors import BackendError, ConfigError, FescaleError, RequestError
from engine.placement import ReplicaPlacement, actor_options, plan_replica, reserve
from engine.planner import check_cluster

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


@ray.remote(num_cpus=0)
class PoolEvents:
    """Counts replica restarts and retried calls from every process that uses the pools, and remembers
    which isolated call each replica is running (so a crash is blamed on the call that caused it)."""

    def __init__(self):
        self.counts: dict[str, int] = {"restarts": 0, "retries": 0}
        self.running: dict[str, str | None] = {}
        self.loaded: dict[str, bool] = {}  # replica -> its model is loaded (False while it (re)starts)

    def record(self, kind: str) -> None:
        self.counts[kind] += 1

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)

    def run(self, replica: str, call: str | None) -> None:
        self.running[replica] = call

    def starting(self, replica: str) -> None:
        """A replica's process is loading its model; a replica seen starting before is a restart."""
        # `running` is kept: a restarted replica can report here before the caller of the call that
        # killed it asks `blamed`, and clearing it then let a poison call retry until restarts ran out.
        if replica in self.loaded:
            self.counts["restarts"] += 1
        self.loaded[replica] = False

    def up(self, replica: str) -> None:
        self.loaded[replica] = True

    def down(self, replica: str) -> None:
        """A client is about to kill this replica: it is not up again until its next incarnation says so."""
        self.loaded[replica] = False

    def is_up(self, replica: str) -> bool:
        return self.loaded.get(replica, False)

    def blamed(self, replica: str) -> str | None:
        return self.running.get(replica)


@ray.remote
class ModelReplica:
    """One model behind one backend. Async: it accepts calls while the model works.

    Ray restarts a replica that dies (`roles.<role>.max_restarts`). A call retried after a crash comes
    back `isolated`: it runs alone on the replica (no other call in flight), and the events actor knows
    it is running, so if the replica dies again the crash is that call's and nobody else's.

    Fault injection for the chaos tests and `benchmarks/chaos.py`, from the replica's env: a request
    containing `FESCALE_CHAOS_CRASH_ON` kills the process (a real crash, not a mock); one containing
    `FESCALE_CHAOS_HANG_ON` never gets an answer.
    """

    def __init__(self, spec: BackendSpec, events):
        self.events = events
        self.id = ray.get_runtime_context().get_actor_id()
        # The constructor waits for the events actor on purpose (no call runs yet). ray.wait, not
        # ray.get: ray.get in an async actor logs a "blocks the event loop" warning meant for methods.
        ray.wait([events.starting.remote(self.id)])
        self.crash_on = os.environ.get("FESCALE_CHAOS_CRASH_ON")
        self.hang_on = os.environ.get("FESCALE_CHAOS_HANG_ON")
        self.backend = make_backend(spec)
        ray.wait([events.up.remote(self.id)])
        self._gate = asyncio.Condition()
        self._shared = 0  # ordinary calls in flight
        self._isolated = False  # an isolated call is running
        self._waiting = 0  # isolated calls waiting (they go first)

    def ready(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), **self.backend.info()}

    async def call(self, method: str, requests: list, isolated: str | None = None) -> list:
        """`method` (chat, next_token_logprobs, classify) of the backend; alone if `isolated`."""
        if isolated is None:
            async with self._gate:
                await self._gate.wait_for(lambda: not self._isolated and not self._waiting)
                self._shared += 1
            try:
                return await self._run(method, requests)
            finally:
                async with self._gate:
                    self._shared -= 1
                    self._gate.notify_all()
        async with self._gate:
            self._waiting += 1
            await self._gate.wait_for(lambda: not self._isolated and not self._shared)
            self._waiting -= 1
            self._isolated = True
        try:
            await self.events.run.remote(self.id, isolated)
            try:
                return await self._run(method, requests)
            finally:  # also after the backend's own error: only a crash leaves the call registered
                await self.events.run.remote(self.id, None)
        finally:
            async with self._gate:
                self._isolated = False
                self._gate.notify_all()

    async def close(self) -> None:
        await self.backend.close()

    async def _run(self, method: str, requests: list) -> list:
        def contains(text: str | None) -> bool:
            return bool(text) and any(text in m["content"] for r in requests for m in r.messages)

        if contains(self.crash_on):
            os._exit(1)
        if contains(self.hang_on):
            await asyncio.Event().wait()  # never answers
        return await getattr(self.backend, method)(requests)


@dataclass(frozen=True)
class RetryPolicy:
    """How a client rides through a replica that dies or hangs (from `pipeline:`)."""

    max_attempts: int = 3
    call_timeout_s: float | None = None
    ready_timeout_s: float = 900.0


class PoolClient:
    """Calls one pool's replicas; the least busy (from this client's view) gets each call.

    A call whose replica dies (or outlives `call_timeout_s`; the replica is then killed and restarted)
    is retried, isolated, on another replica, or on the same one once it is back. Only a death while
    the call ran alone counts against its `max_attempts`: a poison input that crashes its replica every time fails alone, as a
    `RequestError` for its prompt, while the calls that merely shared a crash with it succeed. A replica
    that stays dead (restarts used up) is a `BackendError`: the pool is gone.
    """

    def __init__(self, name: str, replicas: list, events, policy: RetryPolicy):
        self.name, self.replicas, self.events, self.policy = name, replicas, events, policy
        self._in_flight = [0] * len(replicas)

    def __reduce__(self):  # in-flight counts are per process: a copy starts from zero
        return (PoolClient, (self.name, self.replicas, self.events, self.policy))

    async def chat(self, requests: list[ChatRequest]) -> list[ChatResult]:
        return await self._call("chat", requests)

    async def next_token_logprobs(self, requests: list[NextTokenRequest]) -> list[ScoreResult]:
        return await self._call("next_token_logprobs", requests)

    async def classify(self, requests: list[ClassifyRequest]) -> list[ScoreResult]:
        return await self._call("classify", requests)

    async def _call(self, method: str, requests: list) -> list:
        if not requests:
            return []
        call_id: str | None = None  # set once the call has been through a crash: it is retried isolated
        failures = 0
        failed_on: int | None = None
        while True:
            others = [k for k in range(len(self.replicas)) if k != failed_on] or [failed_on]
            i = min(others, key=self._in_flight.__getitem__)
            try:
                return await self._once(i, method, requests, call_id)
            except (ray.exceptions.RayActorError, asyncio.TimeoutError) as e:
                self.events.record.remote("retries")
                hung = isinstance(e, asyncio.TimeoutError)
                what = f"no answer within pipeline.call_timeout_s={self.policy.call_timeout_s}" if hung else _cause(e)
                # Its own fault only if it was running alone when the replica died or the clock ran out; an
                # isolated call that timed out while queued behind another isolated call is not to blame.
                alone = call_id is not None and await self.events.blamed.remote(self.replicas[i]._actor_id.hex()) == call_id
                failures += alone
                if hung and (call_id is None or alone):  # restart it: a hung call may hold it
                    # `ray.kill` lands later: until then the old process still answers, and a retry sent
                    # there would die with it and be blamed for this kill.
                    await self.events.down.remote(self.replicas[i]._actor_id.hex())
                    ray.kill(self.replicas[i], no_restart=False)
                if failures >= self.policy.max_attempts:
                    raise RequestError(
                        f"pool {self.name}: a replica died or hung {failures} times running this prompt's call "
                        f"alone ({what}); giving up on the prompt (pipeline.max_attempts={self.policy.max_attempts})"
                    ) from None
                log.warning("pool %s: a replica failed a call (%s); retrying it alone", self.name, what)
                call_id = call_id or uuid.uuid4().hex
                failed_on = i
                if len(self.replicas) == 1:
                    await self._wait_ready(i)  # else the retry goes to another replica at once

    async def _once(self, i: int, method: str, requests: list, call_id: str | None) -> list:
        self._in_flight[i] += 1
        try:
            ref = self.replicas[i].call.remote(method, requests, call_id)
            return await (asyncio.wait_for(ref, self.policy.call_timeout_s) if self.policy.call_timeout_s else ref)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, FescaleError):  # the replica's own error, without Ray's traceback wrapping
                raise e.cause from None
            raise
        finally:
            self._in_flight[i] -= 1

    async def _wait_ready(self, i: int) -> None:
        """Until Ray has restarted replica i and it has loaded its model; one that stays dead fails the pool."""
        deadline = time.monotonic() + self.policy.ready_timeout_s
        replica = self.replicas[i]
        while time.monotonic() < deadline:
            try:
                await asyncio.wait_for(replica.ready.remote(), max(1.0, deadline - time.monotonic()))
                if await self.events.is_up.remote(replica._actor_id.hex()):
                    return
                await asyncio.sleep(0.5)  # the answer came from a process being killed: not yet restarted
            except ray.exceptions.ActorUnavailableError:
                await asyncio.sleep(1.0)  # restarting
            except ray.exceptions.RayActorError as e:
                raise BackendError(f"pool {self.name}: a replica is dead and out of restarts (roles.*.max_restarts): {_cause(e)}") from None
            except asyncio.TimeoutError:
                break
        raise BackendError(f"pool {self.name}: a replica did not come back within pipeline.ready_timeout_s={self.policy.ready_timeout_s}")


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
        check_models(self.cfg, pools=self.pools.values())  # fail on a bad path before reserving anything
        if any(p.role.num_gpus for p in self.pools.values()):  # and on a cluster the replicas cannot fit
            check_cluster(self.cfg, self.pools.values())
        try:
            self._start()
        except BaseException:
            self.shutdown()
            raise

    def _start(self) -> None:
        timeout = self.cfg.pipeline.ready_timeout_s
        started = time.monotonic()
        self.events = PoolEvents.remote()
        for pool in self.pools.values():
            key = f"roles.{pool.roles[0]}"
            env = {**REPLICA_ENV, **pool.role.env}
            for i in range(pool.role.replicas):
                pg = reserve(pool.placement, f"fescale-{pool.name}-{i}", timeout, key)
                pool.groups.append(pg)
                options = actor_options(pool.placement, pg)
                replica = ModelReplica.options(
                    **options, max_restarts=pool.role.max_restarts, max_task_retries=0, runtime_env={"env_vars": env}
                ).remote(pool.spec, self.events)
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
        return PoolClients({p.key: PoolClient(p.name, p.replicas, self.events, self.policy) for p in self.pools.values()})

    def fault_counts(self) -> dict[str, int]:
        """Replica restarts and retried calls so far, across every process using these pools."""
        return ray.get(self.events.snapshot.remote(), timeout=30) if self.events is not None else {"restarts": 0, "retries": 0}

    async def health(self, timeout_s: float = 2.0) -> dict[str, dict]:
        """Per pool: replicas, how many answer `ready` now (fewer while one restarts), and their PIDs."""

        async def probe(replica) -> int | None:
            try:
                if not await self.events.is_up.remote(replica._actor_id.hex()):
                    return None  # (re)loading its model
                return (await asyncio.wait_for(replica.ready.remote(), timeout_s))["pid"]
            except (ray.exceptions.RayActorError, asyncio.TimeoutError):
                return None

        report = {}
        for name, pool in self.pools.items():
            pids = [pid for pid in await asyncio.gather(*(probe(r) for r in pool.replicas)) if pid is not None]
            report[name] = {"replicas": len(pool.replicas), "ready": len(pids), "pids": pids}
        return report

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
        if self.events is not None:
            ray.kill(self.events)
            self.events = None


def check_models(cfg: FescaleConfig, modes: Iterable[str] | None = None, pools: Iterable[Pool] | None = None) -> None:
    """A `ConfigError` naming the key of the first local model path that does not exist."""
    for pool in pools if pools is not None else plan_pools(cfg, modes).values():
        if pool.role.backend != "openai":
            resolve_model(pool.role.model, key=f"roles.{pool.roles[0]}.model")


def _cause(error: Exception) -> str:
    """The last line of a replica's failure (its own exception message, without Ray's wrapping)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
