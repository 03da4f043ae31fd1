"""A model replica: one backend in one Ray actor, restarted by Ray when it dies; and the events actor
that every process using a set of replicas reports to (restarts, retries, which call runs alone).

This is runtime only: what a replica serves (its `BackendSpec`) and where it runs (its placement
group, Ray options) are decided by the engine (`engine.pools`), and its callers go through
`actors.client.PoolClient`.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import ray

from actors.backend import BackendSpec
from actors.registry import make_backend

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

    Fault injection (tests, `benchmarks.chaos`) is a backend of its own that wraps a real one
    (`benchmarks.faults`), named by import path in the role's `backend`: nothing here looks for it.
    """

    def __init__(self, spec: BackendSpec, events):
        self.events = events
        self.id = ray.get_runtime_context().get_actor_id()
        # The constructor waits for the events actor on purpose (no call runs yet). ray.wait, not
        # ray.get: ray.get in an async actor logs a "blocks the event loop" warning meant for methods.
        ray.wait([events.starting.remote(self.id)])
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
                return await getattr(self.backend, method)(requests)
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
                return await getattr(self.backend, method)(requests)
            finally:  # also after the backend's own error: only a crash leaves the call registered
                await self.events.run.remote(self.id, None)
        finally:
            async with self._gate:
                self._isolated = False
                self._gate.notify_all()

    async def close(self) -> None:
        await self.backend.close()
