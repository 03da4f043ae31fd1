"""`PoolClient` merges the calls of one event-loop turn into one replica call, on a real local Ray
cluster: a replica of `benchmarks.instant_backend.InstantBackend` (no model: it counts the calls it
gets), and the HF backend on a tiny model for a request that fails among others."""

from __future__ import annotations

import asyncio

from actors.backend import ChatRequest, Sampling
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
    assert info["calls"]["response"] == 2  # ten callers in one turn: one call; then one alone
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
