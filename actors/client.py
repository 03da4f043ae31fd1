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
from actors.errors import BackendError, PromptCrashError, last_line, unwrap_ray_error

log = logging.getLogger("fescale")


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
    the call ran alone counts against its `max_attempts`: a poison input that crashes its replica
    every time fails alone, as a `PromptCrashError` for its prompt, while the calls that merely shared
    a crash with it succeed. A replica that stays dead (restarts used up) is a `BackendError`: the
    pool is gone.
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
                what = f"no answer within pipeline.call_timeout_s={self.policy.call_timeout_s}" if hung else last_line(e)
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
                    raise PromptCrashError(
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
