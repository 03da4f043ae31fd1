"""`PoolClient` merges the calls of one event-loop turn into one replica call, on a real local Ray
cluster: a replica of `benchmarks.instant_backend.InstantBackend` (no model: it counts the calls it
gets), and the HF backend on a tiny model for a request that fails among others."""

from __future__ import annotations

import asyncio
import time

import pytest

from actors.backend import ChatRequest, Sampling
from actors.wire import decode_results, encode_requests
from conftest import make_config

INSTANT = {"model": "embedded", "backend": "benchmarks.instant_backend:InstantBackend", "num_cpus": 0.5}


def request(text: str, n: int = 1, max_tokens: int = 8) -> ChatRequest:
    return ChatRequest(({"role": "user", "content": text},), Sampling(n, 0.0, 1.0, max_tokens))


def test_callers_of_one_turn_share_one_replica_call_and_each_gets_its_own_results(ray_session, tiny_model):
    from engine.pools import Pools

    cfg = make_config(tiny_model, mode="greedy", roles={"generator": INSTANT})
    with Pools(cfg) as pools:
        client = pools.client("generator")

        async def callers():
            # prompt lengths differ per caller, so each caller's prompt_tokens tell its results apart
            sizes = [(k, 1 + k % 3) for k in range(10)]
            together = await asyncio.gather(*(client.chat([request("x" * 40 * k, n)] * (1 + k % 2)) for k, n in sizes))
            alone = await client.chat([request("y", 2)])
            return sizes, together, alone

        sizes, together, alone = asyncio.run(callers())
        [info] = ray_session.get([r.ready.remote() for group in pools.replicas.values() for r in group])
    assert info["replica_calls"] == 2  # ten callers in one turn: one actor call; then one alone
    assert info["calls"]["response"] == 11  # in the replica each caller's part runs on its own, to be cancelled alone
    assert info["requests"]["response"] == sum(1 + k % 2 for k in range(10)) + 1
    for (k, n), results in zip(sizes, together):
        assert len(results) == 1 + k % 2
        assert all(len(r.completions) == n and r.prompt_tokens == (40 * k) // 4 + 4 for r in results)
    assert len(alone) == 1 and len(alone[0].completions) == 2


def test_a_request_that_fails_in_a_merged_call_fails_only_its_caller(ray_session, tiny_model):
    """The merged call fails (one prompt is over the context); each caller is retried on its own, so
    only the caller of that prompt sees the error."""
    from actors.errors import ContextLengthError
    from engine.pools import Pools

    cfg = make_config(tiny_model, mode="greedy", roles={"generator": {"model": tiny_model, "backend": "hf", "num_cpus": 1, "threads": 1, "max_model_len": 64}})
    with Pools(cfg) as pools:
        client = pools.client("generator")

        async def callers():
            texts = ["hi", "word " * 200, "hello there", "what is 2 + 2?"]
            return await asyncio.gather(*(client.chat([request(t)]) for t in texts), return_exceptions=True)

        outcomes = asyncio.run(callers())
    assert isinstance(outcomes[1], ContextLengthError)
    assert [type(o).__name__ for k, o in enumerate(outcomes) if k != 1] == ["list"] * 3
    assert all(len(o) == 1 and len(o[0].completions) == 1 for k, o in enumerate(outcomes) if k != 1)


def test_a_cancelled_caller_stops_its_part_on_the_replica_and_the_others_get_theirs(ray_session, tiny_model):
    """Cancellation reaches the replica: a caller whose request would never finish (`hang_on`, a real
    backend that never answers it) is cancelled, merged with two others or alone; its part on the
    replica is stopped (the replica's `cancelled` count), the others are answered, and a cancel that
    arrives before its call drops that call on arrival."""
    from benchmarks.faults import faulty_role
    from engine.pools import Pools

    cfg = make_config(tiny_model, mode="greedy", roles={"generator": faulty_role(INSTANT, hang_on="HANG")})
    with Pools(cfg) as pools:
        client = pools.client("generator")
        [replica] = next(iter(pools.replicas.values()))

        def cancelled() -> int:
            return ray_session.get(replica.ready.remote())["cancelled"]

        async def merged():
            hung = asyncio.ensure_future(client.chat([request("HANG")]))
            others = asyncio.gather(client.chat([request("a")]), client.chat([request("bb", 2)]))
            await asyncio.sleep(1.0)
            assert not others.done()  # merged with the hung caller: the replica call is still out
            hung.cancel()
            return await asyncio.wait_for(others, 60)

        a, bb = asyncio.run(merged())
        assert len(a[0].completions) == 1 and len(bb[0].completions) == 2
        assert cancelled() == 1

        async def alone():
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(client.chat([request("HANG")]), 1.0)

        asyncio.run(alone())
        deadline = time.monotonic() + 60
        while cancelled() < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert cancelled() == 2

        ray_session.get(replica.cancel.remote(["early"]))
        assert decode_results("chat", ray_session.get(replica.call.remote("chat", encode_requests("chat", [request("HANG")]), None, [("early", 1)]))) == [None]
        assert cancelled() == 3


def test_the_restart_budget_is_per_window_so_spread_out_crashes_never_kill_the_pool(ray_session, tiny_model):
    """A poison request crashes its replica twice (once merged, once alone: pipeline.max_attempts=1).
    With 2 restarts per 20 s, two poison requests 20 s apart cost 4 restarts and the pool lives on;
    a third one right after the second is a crash loop: the replica is killed for good and its pool
    says so. A lifetime budget of 2 would have ended the pool at the second request."""
    from actors.errors import BackendError, PromptCrashError
    from benchmarks.faults import faulty_role
    from engine.pools import Pools

    role = faulty_role({**INSTANT, "max_restarts": 2, "restart_window_s": 20}, crash_on="POISON")
    cfg = make_config(tiny_model, mode="greedy", roles={"generator": role}, pipeline={"max_attempts": 1, "ready_timeout_s": 120})
    with Pools(cfg) as pools:
        client = pools.client("generator")

        async def ask(text: str):
            return await client.chat([request(text)])

        with pytest.raises(PromptCrashError):
            asyncio.run(ask("POISON"))
        time.sleep(20.5)  # the first two restarts leave the window
        with pytest.raises(PromptCrashError):
            asyncio.run(ask("POISON"))
        assert len(asyncio.run(ask("fine"))[0].completions) == 1
        assert pools.fault_counts()["restarts"] == 4
        with pytest.raises(BackendError, match=r"used up its restarts \(roles.\*.max_restarts within roles.\*.restart_window_s\)"):
            asyncio.run(ask("POISON"))
