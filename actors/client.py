"""The client of a pool of model replicas: picklable, least-busy routing, retries through crashes.

Stages, the Serve app and trainers call a pool through a `PoolClient` (it satisfies
`actors.backend.ModelClient`, like a backend in-process). It only needs the replica handles, the
events actor and a `RetryPolicy`; it knows nothing of configs.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

import ray

from actors.backend import ChatRequest, ChatResult, ClassifyRequest, NextTokenRequest, ScoreResult
from actors.errors import BackendError, ConfigError, PromptCrashError, last_line, unwrap_ray_error

log = logging.getLogger("fescale")


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

    A call whose replica dies (or outlives `call_timeout_s`; the replica is then killed and restarted)
    is retried, isolated, on another replica, or on the same one once it is back. Only a death while
    the call ran alone counts against its `max_attempts`: a poison input that crashes its replica
    every time fails alone, as a `PromptCrashError` for its prompt, while the calls that merely shared
    a crash with it succeed. A replica that stays dead (restarts used up) is a `BackendError`: the
    pool is gone.
    """

    def __init__(self, name: str, replicas: list, events, policy: RetryPolicy):
        self.name, self.replicas, self.events, self.policy = name, replicas, events, policy
        self._in_flight = [0] * len(replicas)
        self._waiting: dict[str, list[tuple[list, asyncio.Future]]] = {}  # method -> calls of this loop turn
        self._sending: set[asyncio.Task] = set()

    def __reduce__(self):  # in-flight counts and queued calls are per process: a copy starts from zero
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
        try:
            return await self._merged(method, requests)
        except _Shared as shared:  # each caller again on its own: a crash's retry is isolated, as any crash's
            return await self._retried(method, requests, crashed_on=shared.crashed_on)

    async def _merged(self, method: str, requests: list) -> list:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        waiting = self._waiting.setdefault(method, [])
        waiting.append((requests, future))
        if len(waiting) == 1:  # after the callbacks already queued: the callers resumed in this turn
            loop.call_soon(self._flush, method)
        return await future

    def _flush(self, method: str) -> None:
        task = asyncio.ensure_future(self._send(method, self._waiting.pop(method)))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, method: str, callers: list[tuple[list, asyncio.Future]]) -> None:
        """Hand each caller its part: its results, its error, or `_Shared` (retry your part alone)."""
        try:
            parts = await self._merged_call(method, callers)
        except asyncio.CancelledError:
            for _, future in callers:
                future.cancel()
            raise
        except Exception as e:  # everyone's (the pool is gone, a setting is wrong), or a lone caller's own
            parts = [e] * len(callers)
        for (_, future), part in zip(callers, parts):
            if not future.done():  # a caller that was cancelled meanwhile takes nothing
                future.set_exception(part) if isinstance(part, BaseException) else future.set_result(part)

    async def _merged_call(self, method: str, callers: list[tuple[list, asyncio.Future]]) -> list:
        if len(callers) == 1:
            return [await self._retried(method, callers[0][0])]  # its error, if any, is its own (`_send`)
        i = self._least_busy(None)
        try:
            results = await self._once(i, method, [r for requests, _ in callers for r in requests], None)
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
        for requests, _ in callers:
            parts.append(results[start : start + len(requests)])
            start += len(requests)
        return parts

    async def _retried(self, method: str, requests: list, crashed_on: int | None = None) -> list:
        """One caller's call through replica crashes and hangs (see the class docstring); `crashed_on`:
        the replica that died under this call's first attempt, merged with others."""
        call_id: str | None = None if crashed_on is None else uuid.uuid4().hex  # set once through a crash: retried isolated
        failures = 0
        failed_on = crashed_on
        while True:
            i = self._least_busy(failed_on)
            try:
                return await self._once(i, method, requests, call_id)
            except (ray.exceptions.RayActorError, asyncio.TimeoutError) as e:
                alone, what = await self._failed(i, e, call_id)
                failures += alone
                if failures >= self.policy.max_attempts:
                    raise PromptCrashError(
                        f"pool {self.name}: a replica died or hung {failures} times running this prompt's call "
                        f"alone ({what}); giving up on the prompt (pipeline.max_attempts={self.policy.max_attempts})"
                    ) from None
                log.warning("pool %s: a replica failed a call (%s); retrying it alone", self.name, what)
                call_id = call_id or uuid.uuid4().hex
                failed_on = i
                if len(self.replicas) == 1:
                    await self._wait_ready(i)  # else the retry goes to another replica at once

    def _least_busy(self, failed_on: int | None) -> int:
        others = [k for k in range(len(self.replicas)) if k != failed_on] or [failed_on]
        return min(others, key=self._in_flight.__getitem__)

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
        return alone, what

    async def _once(self, i: int, method: str, requests: list, call_id: str | None) -> list:
        self._in_flight[i] += 1
        try:
            ref = self.replicas[i].call.remote(method, requests, call_id)
            return await (asyncio.wait_for(ref, self.policy.call_timeout_s) if self.policy.call_timeout_s else ref)
        except ray.exceptions.RayTaskError as e:
            own = unwrap_ray_error(e)  # the replica's own error, without Ray's traceback wrapping
            if own is not None:
                raise own from None
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
                raise BackendError(f"pool {self.name}: a replica is dead and out of restarts (roles.*.max_restarts): {last_line(e)}") from None
            except asyncio.TimeoutError:
                break
        raise BackendError(f"pool {self.name}: a replica did not come back within pipeline.ready_timeout_s={self.policy.ready_timeout_s}")


class _Shared(Exception):
    """A merged call failed: each caller retries its own part (isolated, if replica `crashed_on` died)."""

    def __init__(self, crashed_on: int | None):
        super().__init__("merged call failed")
        self.crashed_on = crashed_on

