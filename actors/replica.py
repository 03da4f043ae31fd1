"""A model replica: one backend in one Ray actor, restarted by Ray when it dies; and the events actor
that every process using a set of replicas reports to (restarts, retries, which call runs alone).

This is runtime only: what a replica serves (its `BackendSpec`) and where it runs (its placement
group, Ray options) are decided by the engine (`engine.pools`), and its callers go through
`actors.client.PoolClient`.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import OrderedDict
from typing import Any

import ray

from actors.backend import BackendSpec
from actors.heap import freeze_startup_heap
from actors.registry import make_backend
from actors.wire import decode_requests, encode_results

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

# Tags of cancelled callers kept, for a cancel that overtakes its call (sent right after it, on
# another connection); a call arrives within moments, so a few thousand recent ones are plenty.
CANCELLED_REMEMBERED = 4096


@ray.remote(num_cpus=0)
class PoolEvents:
    """Counts replica restarts and retried calls from every process that uses the pools, and remembers
    which isolated call each replica is running (so a crash is blamed on the call that caused it)."""

    def __init__(self):
        self.counts: dict[str, int] = {"restarts": 0, "retries": 0}
        self.running: dict[str, str | None] = {}
        self.loaded: dict[str, bool] = {}  # replica -> its model is loaded (False while it (re)starts)
        self.restarted: dict[str, list[float]] = {}  # replica -> its restarts within the budget's window

    def record(self, kind: str) -> None:
        self.counts[kind] += 1

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)

    def run(self, replica: str, call: str | None) -> None:
        self.running[replica] = call

    def starting(self, replica: str, handle, max_restarts: int, window_s: float) -> None:
        """A replica's process is loading its model; a replica seen starting before is a restart.

        Ray restarts replicas without limit; the budget is kept here, per replica: at most
        `max_restarts` restarts within any `window_s` seconds. One more means it crash-loops (a model
        that cannot run here, a machine out of memory), and it is killed for good: its pool reports
        it dead. Crashes spread over time (a poison request now and then) never use the budget up."""
        # `running` is kept: a restarted replica can report here before the caller of the call that
        # killed it asks `blamed`, and clearing it then let a poison call retry until restarts ran out.
        if replica in self.loaded:
            now = time.monotonic()
            recent = [t for t in self.restarted.get(replica, []) if now - t < window_s] + [now]
            self.restarted[replica] = recent
            if len(recent) > max_restarts:  # not counted: this restart does not happen
                ray.kill(handle, no_restart=True)
            else:
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

    Ray restarts a replica that dies (`roles.<role>.max_restarts` within `restart_window_s`). A call retried after a crash comes
    back `isolated`: it runs alone on the replica (no other call in flight), and the events actor knows
    it is running, so if the replica dies again the crash is that call's and nobody else's.

    Fault injection (tests, `benchmarks.chaos`) is a backend of its own that wraps a real one
    (`benchmarks.faults`), named by import path in the role's `backend`: nothing here looks for it.
    """

    def __init__(self, spec: BackendSpec, events: str, restarts: tuple[int, float] = (0, float("inf"))):
        """`events`: the name of the pools' `PoolEvents` actor. A name, not its handle: Ray logs an
        error for every restartable actor with an actor handle among its constructor arguments
        (ray-project/ray#53727), and a replica is looked up by name just as well.
        `restarts`: (max_restarts, window_s), the restart budget `PoolEvents.starting` keeps."""
        self.events = events = ray.get_actor(events)
        context = ray.get_runtime_context()
        self.id = context.get_actor_id()
        # The constructor waits for the events actor on purpose (no call runs yet). ray.wait, not
        # ray.get: ray.get in an async actor logs a "blocks the event loop" warning meant for methods.
        ray.wait([events.starting.remote(self.id, context.current_actor, *restarts)])
        self.backend = make_backend(spec)
        ray.wait([events.up.remote(self.id)])
        self._gate = asyncio.Condition()
        self._shared = 0  # ordinary calls in flight
        self._isolated = False  # an isolated call is running
        self._waiting = 0  # isolated calls waiting (they go first)
        self.calls = 0  # actor calls taken (`ready` reports it: a merged call of many callers is one)
        self.cancelled = 0  # callers' parts stopped by `cancel` (running, or dropped on arrival)
        self._running: dict[str, asyncio.Task] = {}  # caller tag -> its part's task
        self._cancelled: OrderedDict[str, None] = OrderedDict()  # recently cancelled tags, oldest first
        freeze_startup_heap()  # the backend's model and Ray's modules are here for good

    def ready(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), "replica_calls": self.calls, "cancelled": self.cancelled, **self.backend.info()}

    async def call(self, method: str, payload: Any, isolated: str | None = None, spans: list[tuple[str, int]] | None = None) -> Any:
        """`method` (chat, next_token_logprobs, classify, update_weights) of the backend; alone if `isolated`.

        `payload`: the requests as `actors.wire` encodes them for `method`; the results go back the
        same way. `spans` are the callers merged into this call, in order: (tag, how many of the
        requests are theirs). Each caller's part runs as its own task, so `cancel(tag)` stops one
        caller's work and not the others'; a cancelled part comes back as `None`s nobody reads."""
        requests = decode_requests(method, payload)
        spans = spans or [("", len(requests))]
        self.calls += 1
        if isolated is None:
            async with self._gate:
                await self._gate.wait_for(lambda: not self._isolated and not self._waiting)
                self._shared += 1
            try:
                return encode_results(method, await self._parts(method, requests, spans))
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
                return encode_results(method, await self._parts(method, requests, spans))
            finally:  # also after the backend's own error: only a crash leaves the call registered
                await self.events.run.remote(self.id, None)
        finally:
            async with self._gate:
                self._isolated = False
                self._gate.notify_all()

    async def _parts(self, method: str, requests: list, spans: list[tuple[str, int]]) -> list:
        run = getattr(self.backend, method)
        tasks: list[asyncio.Task | None] = []
        start = 0
        for tag, count in spans:
            part = requests[start : start + count]
            start += count
            if tag in self._cancelled:  # cancelled before it arrived
                self.cancelled += 1
                tasks.append(None)
                continue
            task = asyncio.ensure_future(run(part))
            if tag:
                self._running[tag] = task
            tasks.append(task)
        live = [t for t in tasks if t is not None]
        try:
            if live:
                await asyncio.wait(live)
        except asyncio.CancelledError:  # the whole call cancelled (Ray's cancel): every part stops
            for task in live:
                task.cancel()
            raise
        finally:
            for tag, _ in spans:
                self._running.pop(tag, None)
        # Every part's exception is read, not only the first: one left unread is logged with its
        # traceback as "Task exception was never retrieved" when the task is collected.
        errors = [task.exception() for task in live if not task.cancelled()]
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
        results: list = []
        for (_, count), task in zip(spans, tasks):
            results += [None] * count if task is None or task.cancelled() else task.result()
        return results

    async def stream(self, request, tag: str):
        """`chat_stream` of the backend, item by item (a Ray streaming generator); `cancel(tag)` stops it."""
        if tag in self._cancelled:
            return
        self.calls += 1
        self._running[tag] = asyncio.current_task()
        try:
            async for item in self.backend.chat_stream(request):
                yield item
        finally:
            self._running.pop(tag, None)

    def cancel(self, tags: list[str]) -> None:
        """Stop the work of these callers (their client is gone): a running part is cancelled (the
        backend aborts or drops it), a part that has not arrived yet is dropped when it does."""
        for tag in tags:
            self._cancelled[tag] = None
            task = self._running.get(tag)
            if task is not None and task.cancel():
                self.cancelled += 1
        while len(self._cancelled) > CANCELLED_REMEMBERED:
            self._cancelled.popitem(last=False)

    async def close(self) -> None:
        await self.backend.close()
