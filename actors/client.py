"""The client of a pool of model replicas: picklable, least-busy routing, retries through crashes.

Stages, the Serve app and trainers call a pool through a `PoolClient` (it satisfies
`actors.backend.ModelClient`, like a backend in-process). It only needs the replica handles, the
events actor and a `RetryPolicy`; it knows nothing of configs.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

import ray

from actors.backend import ChatRequest, ChatResult, ClassifyRequest, NextTokenRequest, ScoreResult
from actors.errors import BackendError, ConfigError, PromptCrashError, last_line, unwrap_ray_error
from actors.wire import decode_results, encode_requests

log = logging.getLogger("fescale")

# Caller tags: unique across every process that calls a replica. A fresh uuid4 per call read the OS's
# random source each time, a measurable cost at hundreds of calls per second (engine_overhead).
_PROCESS_TAG = uuid.uuid4().hex
_serial = itertools.count()


def _new_tag() -> str:
    return f"{_PROCESS_TAG}-{next(_serial)}"


@dataclass(frozen=True)
class RetryPolicy:
    """How a client rides through a replica that dies or hangs (from `pipeline:`)."""

    max_attempts: int = 3
    call_timeout_s: float | None = None
    ready_timeout_s: float = 900.0


class PoolClient:
    """Calls one pool's replicas; the least busy (from this client's view) gets each call.

    Calls that callers make in the same turn of the event loop go to a replica as one actor call
    (each caller gets its own slice of the results): the pipeline's stage actor runs many prompts at
    once, and a call per prompt and step cost more CPU in Ray's call machinery and pickling than the
    method itself (benchmarks.engine_overhead). What fails in a merged call is retried per caller,
    so a failure stays with the caller it belongs to.

    A caller that is cancelled (a client gone, a deadline passed) takes its requests with it: still
    queued here, they are never sent; already on a replica, the replica is told to cancel that
    caller's part (`ModelReplica.cancel`: vLLM aborts, the HF backend drops or stops them, an
    endpoint's connection closes), and the other callers of a merged call go on.

    A call whose replica dies (or outlives `call_timeout_s`; the replica is then killed and restarted)
    is retried, isolated, on another replica, or on the same one once it is back. A replica that
    failed takes no new calls while it is down (`_out_of_rotation`), so a dead one costs no caller a
    failed attempt. Only a death while
    the call ran alone counts against its `max_attempts`: a poison input that crashes its replica
    every time fails alone, as a `PromptCrashError` for its prompt, while the calls that merely shared
    a crash with it succeed. A replica that stays dead (restarts used up) is a `BackendError`: the
    pool is gone.
    """

    def __init__(self, name: str, replicas: list, events, policy: RetryPolicy):
        self.name, self.replicas, self.events, self.policy = name, replicas, events, policy
        self._in_flight = [0] * len(replicas)
        self._waiting: dict[str, list[_Caller]] = {}  # method -> calls of this loop turn
        self._sending: set[asyncio.Task] = set()
        self._down: dict[int, asyncio.Task] = {}  # replicas out of rotation -> the task waiting for each to be back

    def __reduce__(self):  # in-flight counts and queued calls are per process: a copy starts from zero
        return (PoolClient, (self.name, self.replicas, self.events, self.policy))

    async def chat(self, requests: list[ChatRequest]) -> list[ChatResult]:
        return await self._call("chat", requests)

    async def next_token_logprobs(self, requests: list[NextTokenRequest]) -> list[ScoreResult]:
        return await self._call("next_token_logprobs", requests)

    async def classify(self, requests: list[ClassifyRequest]) -> list[ScoreResult]:
        return await self._call("classify", requests)

    async def chat_stream(self, request: ChatRequest) -> AsyncIterator[str | ChatResult]:
        """One completion as it is generated (`Backend.chat_stream`), from the least busy replica.

        Not merged and not retried: the caller has seen text already. A replica that dies under it
        fails this stream only (`PromptCrashError`); a caller that stops reading cancels it there."""
        i = self._least_busy(None)
        tag = _new_tag()
        self._in_flight[i] += 1
        done = False
        try:
            async for ref in self.replicas[i].stream.options(num_returns="streaming").remote(request, tag):
                yield await ref
            done = True
        except ray.exceptions.RayTaskError as e:
            own = unwrap_ray_error(e)
            if own is not None:
                raise own from None
            raise
        except ray.exceptions.RayActorError as e:
            self._out_of_rotation(i)
            raise PromptCrashError(f"pool {self.name}: the replica streaming this answer died ({last_line(e)})") from None
        finally:
            self._in_flight[i] -= 1
            if not done:  # cancelled, or the caller stopped reading: the replica stops generating
                self.replicas[i].cancel.remote([tag])

    async def _call(self, method: str, requests: list) -> list:
        if not requests:
            return []
        caller = _Caller(requests)
        try:
            return await self._merged(method, caller)
        except _Shared as shared:  # each caller again on its own: a crash's retry is isolated, as any crash's
            return await self._retried(method, caller, crashed_on=shared.crashed_on)

    async def _merged(self, method: str, caller: "_Caller") -> list:
        loop = asyncio.get_running_loop()
        caller.future = loop.create_future()
        caller.future.add_done_callback(lambda future: future.cancelled() and self._cancel(caller))
        waiting = self._waiting.setdefault(method, [])
        waiting.append(caller)
        if len(waiting) == 1:  # after the callbacks already queued: the callers resumed in this turn
            # In a context of its own: Ray ties an actor call to the task that made it, and cancelling
            # that task (Serve does, when its client leaves) would cancel every caller's merged call.
            loop.call_soon(self._flush, method, context=contextvars.Context())
        return await caller.future

    def _flush(self, method: str) -> None:
        callers = [c for c in self._waiting.pop(method) if not c.future.done()]  # the cancelled are never sent
        if callers:
            task = asyncio.ensure_future(self._send(method, callers))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, method: str, callers: list["_Caller"]) -> None:
        """Hand each caller its part: its results, its error, or `_Shared` (retry your part alone)."""
        try:
            parts = await self._merged_call(method, callers)
        except asyncio.CancelledError:
            for caller in callers:
                caller.future.cancel()
            raise
        except Exception as e:  # everyone's (the pool is gone, a setting is wrong), or a lone caller's own
            parts = [e] * len(callers)
        for caller, part in zip(callers, parts):
            if not caller.future.done():  # a caller that was cancelled meanwhile takes nothing
                caller.future.set_exception(part) if isinstance(part, BaseException) else caller.future.set_result(part)

    async def _merged_call(self, method: str, callers: list["_Caller"]) -> list:
        if len(callers) == 1:
            return [await self._retried(method, callers[0])]  # its error, if any, is its own (`_send`)
        i = self._least_busy(None)
        try:
            results = await self._once(i, method, callers, None)
        except (BackendError, ConfigError):
            raise
        except (ray.exceptions.RayActorError, asyncio.TimeoutError) as e:
            _, what = await self._failed(i, e, None)
            log.warning("pool %s: a replica failed a call of %d callers (%s); retrying each alone", self.name, len(callers), what)
            if len(self.replicas) == 1:
                await self._wait_ready(i)  # a replica out of restarts: the BackendError is everyone's
            return [_Shared(crashed_on=i)] * len(callers)
        except Exception:  # one caller's request (too long, say): each caller again on its own finds whose
            return [_Shared(crashed_on=None)] * len(callers)
        parts, start = [], 0
        for caller in callers:
            parts.append(results[start : start + len(caller.requests)])
            start += len(caller.requests)
        return parts

    async def _retried(self, method: str, caller: "_Caller", crashed_on: int | None = None) -> list:
        """One caller's call through replica crashes and hangs (see the class docstring); `crashed_on`:
        the replica that died under this call's first attempt, merged with others."""
        call_id: str | None = None if crashed_on is None else _new_tag()  # set once through a crash: retried isolated
        failures = 0
        failed_on = crashed_on
        while True:
            i = self._least_busy(failed_on)
            try:
                return await self._once(i, method, [caller], call_id)
            except (ray.exceptions.RayActorError, asyncio.TimeoutError) as e:
                alone, what = await self._failed(i, e, call_id)
                failures += alone
                if failures >= self.policy.max_attempts:
                    raise PromptCrashError(
                        f"pool {self.name}: a replica died or hung {failures} times running this prompt's call "
                        f"alone ({what}); giving up on the prompt (pipeline.max_attempts={self.policy.max_attempts})"
                    ) from None
                log.warning("pool %s: a replica failed a call (%s); retrying it alone", self.name, what)
                call_id = call_id or _new_tag()
                failed_on = i
                if len(self.replicas) == 1:
                    await self._wait_ready(i)  # else the retry goes to another replica at once

    def _least_busy(self, failed_on: int | None) -> int:
        others = [k for k in range(len(self.replicas)) if k != failed_on] or [failed_on]
        up = [k for k in others if k not in self._down]  # a replica out of rotation only if none is up
        return min(up or others, key=self._in_flight.__getitem__)

    def _out_of_rotation(self, i: int) -> None:
        """After replica i failed a call: no new calls go there until it answers `ready` again (a
        restarted replica loads its model first; one dead for good never comes back). With one
        replica there is nowhere else to go: its callers wait for it (`_wait_ready`)."""
        if len(self.replicas) > 1 and i not in self._down:
            self._down[i] = asyncio.ensure_future(self._back(i))

    async def _back(self, i: int) -> None:
        try:
            await self._wait_ready(i)
        except BackendError:
            return  # dead for good: stays out
        self._down.pop(i, None)
        log.info("pool %s: replica %d is back in rotation", self.name, i)

    async def _failed(self, i: int, e: Exception, call_id: str | None) -> tuple[bool, str]:
        """Book a replica's death or hang under a call: (whether the call ran alone, what happened)."""
        self.events.record.remote("retries")
        hung = isinstance(e, asyncio.TimeoutError)
        what = f"no answer within pipeline.call_timeout_s={self.policy.call_timeout_s}" if hung else last_line(e)
        # Its own fault only if it was running alone when the replica died or the clock ran out; an
        # isolated call that timed out while queued behind another isolated call is not to blame.
        alone = call_id is not None and await self.events.blamed.remote(self.replicas[i]._actor_id.hex()) == call_id
        if hung and (call_id is None or alone):  # restart it: a hung call may hold it
            # `ray.kill` lands later: until then the old process still answers, and a retry sent
            # there would die with it and be blamed for this kill.
            await self.events.down.remote(self.replicas[i]._actor_id.hex())
            ray.kill(self.replicas[i], no_restart=False)
        self._out_of_rotation(i)  # (after `down`: its first probe must not find the process being killed up)
        return alone, what

    async def _once(self, i: int, method: str, callers: list["_Caller"], call_id: str | None) -> list:
        self._in_flight[i] += 1
        for caller in callers:
            caller.replica = i
        try:
            spans = [(c.tag, len(c.requests)) for c in callers]
            payload = encode_requests(method, [r for c in callers for r in c.requests])
            ref = self.replicas[i].call.remote(method, payload, call_id, spans)
            for caller in callers:  # cancelled between the flush and this send: the replica drops it on arrival
                if caller.future is not None and caller.future.cancelled():
                    self._cancel(caller)
            return decode_results(method, await (asyncio.wait_for(ref, self.policy.call_timeout_s) if self.policy.call_timeout_s else ref))
        except asyncio.CancelledError:  # this call's awaiter is gone (a lone caller cancelled, or shutdown)
            for caller in callers:
                self._cancel(caller)
            raise
        except ray.exceptions.RayTaskError as e:
            own = unwrap_ray_error(e)  # the replica's own error, without Ray's traceback wrapping
            if own is not None:
                raise own from None
            raise
        finally:
            for caller in callers:
                caller.replica = None
            self._in_flight[i] -= 1

    def _cancel(self, caller: "_Caller") -> None:
        """Tell the replica running a cancelled caller's requests to stop them (nothing to do while queued)."""
        if caller.replica is not None:
            self.replicas[caller.replica].cancel.remote([caller.tag])
            caller.replica = None

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
                raise BackendError(f"pool {self.name}: a replica is dead: it used up its restarts (roles.*.max_restarts within roles.*.restart_window_s): {last_line(e)}") from None
            except asyncio.TimeoutError:
                break
        raise BackendError(f"pool {self.name}: a replica did not come back within pipeline.ready_timeout_s={self.policy.ready_timeout_s}")


@dataclass(eq=False)
class _Caller:
    """One `chat`/`score` call: its requests, the tag its replica knows them by, its future while
    merged, and the replica running them now (where a cancellation is sent)."""

    requests: list
    tag: str = field(default_factory=_new_tag)
    future: asyncio.Future | None = None
    replica: int | None = None


class _Shared(Exception):
    """A merged call failed: each caller retries its own part (isolated, if replica `crashed_on` died)."""

    def __init__(self, crashed_on: int | None):
        super().__init__("merged call failed")
        self.crashed_on = crashed_on

