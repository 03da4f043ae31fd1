"""The engine-overhead benchmark's premises: the instant backend answers every method like a model in
shape, the workload is the issue's (N=8, M=16 all effective, 6 sets per response, K=1), and a small
run goes through the real pools and Ray Data stages with every prompt answered."""

from __future__ import annotations

import asyncio

from actors.backend import BackendSpec, ChatRequest, ClassifyRequest, NextTokenRequest, Sampling
from benchmarks.engine_overhead import BACKEND, ROLE, WORKLOAD, measure, state_bytes, synthetic
from benchmarks.instant_backend import InstantBackend, tagged
from benchmarks.workload import DirectClient, run_flat
from engine import method, templates
from engine.config import load_config
from engine.steps import build_steps


def _cfg(*overrides: str):
    return load_config("feedback_edit", [*ROLE, *WORKLOAD, *overrides])


def test_the_instant_backend_answers_every_method_in_shape():
    backend = InstantBackend(BackendSpec(backend=BACKEND, model="unused"))
    prompt = ({"role": "user", "content": tagged("p7", "Why is the sky blue?")},)

    def turn(instruction: str) -> tuple[dict, ...]:
        return (*prompt, {"role": "assistant", "content": "Because of Rayleigh scattering."}, {"role": "user", "content": instruction})

    edit = method.edit_instruction(["The response is mostly helpful."], templates.EDIT, "\n", templates.EDIT_FILLER)

    async def run():
        return (
            await backend.chat([ChatRequest(prompt, Sampling(n=8, max_tokens=2048))]),
            await backend.chat([ChatRequest(turn(templates.FEEDBACK), Sampling(n=16, max_tokens=1024))] * 2),
            await backend.chat([ChatRequest(turn(edit), Sampling(n=1, max_tokens=5))]),
            await backend.next_token_logprobs([NextTokenRequest(turn(templates.JUDGE), ("Yes",)), NextTokenRequest(prompt, (" a", " b", " c"))]),
            await backend.classify([ClassifyRequest(prompt)]),
        )

    [responses], feedback, [edited], scores, [classified] = asyncio.run(run())
    assert len(responses.completions) == 8 and len({c.text for c in responses.completions}) == 8  # distinct texts
    assert 40 <= len(responses.completions[0].text.split()) <= 90 and responses.completions[0].finish_reason == "stop"
    assert [len(r.completions) for r in feedback] == [16, 16]
    assert all(method.parse_level(c.text) == "mostly" and method.count_keywords(c.text) >= 3 for c in feedback[0].completions)
    assert (edited.completions[0].tokens, edited.completions[0].finish_reason) == (5, "length")  # capped at max_tokens
    assert [len(s.scores) for s in scores] == [1, 3] and len(classified.scores) == 1
    assert all(r.prompt_tokens > 0 for r in [responses, *feedback, edited, *scores, classified])
    info = backend.info()
    assert info["calls"] == {"all": 5, "response": 1, "feedback": 1, "edit": 1, "select": 2}
    assert info["requests"] == {"response": 1, "feedback": 2, "edit": 1, "select": 3}
    assert info["completions"] == 8 + 32 + 1 and set(info["arrivals"]["p7"]) == {"response", "feedback", "edit", "select"}


def test_the_workload_is_n8_m16_all_kept_six_sets_one_edit_each():
    cfg = _cfg()
    client = DirectClient(InstantBackend(BackendSpec(backend=BACKEND, model="unused")))
    [state], _ = asyncio.run(run_flat(cfg, build_steps(cfg, lambda role: client), synthetic(1)))
    assert len(state.candidates) == 8
    for cand in state.candidates:
        assert len(cand.feedback) == 16 and all(f.kept for f in cand.feedback)
        assert [len(s) for s in cand.feedback_sets] == [3, 3, 3, 3, 3, 1]
        assert len(cand.edits) == 6
    assert state.final and state.selected is not None
    sizes = state_bytes(cfg)
    assert list(sizes) == ["input", "generate", "feedback", "filter", "edit", "select"] and sizes["select"] > sizes["generate"] > sizes["input"]


def test_a_small_run_goes_through_the_real_pools_and_stages(ray_session):
    cfg = _cfg("pipeline.batch_size=4")
    r = measure(cfg, synthetic(16), synthetic(2, prefix="w"))
    assert (r["answered"], r["failed"]) == (16, 0), r["errors"]
    assert sorted(r["rows_at"]) == sorted(f"p{k}" for k in range(16)) == sorted(r["seen_at"])
    # the warm-up is not counted; the pool merges the calls of many prompts and steps
    assert r["requests_by_kind"] == {"response": 16 * 1, "feedback": 16 * 8, "edit": 16 * 48, "select": 16 * 48}
    assert 0 < r["calls"] < 16 * 4 and r["stage"]["active_s"] > 0
    assert r["cpu"]["driver"] and r["cpu"]["model replica"]
