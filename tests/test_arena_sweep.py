"""A tiny end-to-end Arena Hard sweep: real Ray, the embedded SmolLM2 answering, and the same model
judging through fescale's own OpenAI-compatible Serve app over HTTP on 127.0.0.1 (no test double).

Two points (the greedy reference and best-of-2) over two short questions in arena-hard-auto's v0.1
format, judged against hand-written baseline answers. SmolLM2-135M is no real judge: the test
checks the machinery (files, games, continuation, table, plots, resume), not its verdicts.
"""

from __future__ import annotations

import json
import socket

import pytest
import yaml

from conftest import make_config

pytestmark = pytest.mark.slow

QUESTIONS = [
    {"question_id": "q-capital", "category": "arena-hard-v0.1", "cluster": "geo", "turns": [{"content": "What is the capital of France?"}]},
    {"question_id": "q-add", "category": "arena-hard-v0.1", "cluster": "math", "turns": [{"content": "What is 2 + 3?"}]},
]
BASELINE = {"q-capital": "Paris.", "q-add": "5"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def judge_url(ray_session, embedded_dir):
    from ray import serve

    from engine.serve_app import run_app

    cfg = make_config(
        "embedded",
        mode="greedy",
        roles={"generator": {"model": "embedded", "backend": "hf", "num_cpus": 1, "threads": 2, "max_model_len": 2048}},
        serve={"host": "127.0.0.1", "port": free_port(), "modes": ["greedy"]},
    )
    yield run_app(cfg)
    serve.shutdown()


def test_tiny_sweep_end_to_end(judge_url, embedded_dir, tmp_path):
    from benchmarks.arena_hard.formats import Answer, read_answers, read_judgments
    from benchmarks.arena_hard.sweep import load_grid, pick_for_budget, run_sweep

    (tmp_path / "question.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (tmp_path / "gpt-4-0314.jsonl").write_text(
        "".join(json.dumps(Answer(qid, "gpt-4-0314", text, 2, "v0.1").to_row()) + "\n" for qid, text in BASELINE.items())
    )
    config = {  # the model's folder, not "embedded": its own pool, beside the judge's in the same cluster
        "roles": {"generator": {"model": embedded_dir, "backend": "hf", "num_cpus": 1, "threads": 2}},
        "generate": {"max_tokens": 12},
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(config))
    grid = {
        "name": "tiny",
        "config": str(tmp_path / "base.yaml"),
        "questions": "question.jsonl",  # relative to the grid file
        "baseline_answers": "gpt-4-0314.jsonl",
        "judge": {
            "model": "fescale",
            "name": "smollm2-judge",
            "endpoint": {"base_url": f"{judge_url}/v1", "timeout_s": 600, "max_retries": 0, "max_concurrency": 4},
            "max_tokens": 16,
        },
        "axes": {"responses": {"key": "generate.num_responses", "values": [2], "set": ["mode=best_of_n"]}},
    }
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    out = tmp_path / "sweep"
    results = run_sweep(load_grid(tmp_path / "grid.yaml"), out, progress=False)

    assert [(r.axis, r.label) for r in results] == [("reference", "greedy"), ("responses", "2")]
    greedy, best_of_2 = results
    assert greedy.tokens_vs_reference == 1.0 and best_of_2.generated_tokens > greedy.generated_tokens
    for r in results:
        answers = read_answers(out / "data" / "model_answer" / f"{r.model_id}.jsonl")
        assert set(answers) == {"q-capital", "q-add"}
        assert all(a.token_len > 0 and a.cost.generated_tokens >= a.token_len and a.cost.latency_s > 0 for a in answers.values())
    judgments = read_judgments(out / "data" / "model_judgment" / "smollm2-judge")
    assert len(judgments) == 4 and all(len(j.games) == 2 for j in judgments)
    for j in judgments:
        g1, g2 = j.games
        assert "<|The Start of Assistant A's Answer|>\nParis." in g1.user_prompt or "<|The Start of Assistant A's Answer|>\n5\n" in g1.user_prompt
        assert "<|The Start of Assistant B's Answer|>\nParis." in g2.user_prompt or "<|The Start of Assistant B's Answer|>\n5\n" in g2.user_prompt
        for g in j.games:  # without a verdict the judge was asked once to continue: two turns
            assert g.judgment.count("\n") >= (1 if g.score else 2)
    for name in ("sweep.json", "sweep.md", "scaling.png", "pareto.png"):
        assert (out / name).stat().st_size > 0
    table = (out / "sweep.md").read_text()
    assert "| reference | greedy" in table and "| responses | 2" in table
    scored = [r for r in results if r.score is not None]
    if scored:
        assert pick_for_budget(results, max(r.generated_tokens for r in scored)) is not None

    # a rerun reuses every answer and judgment
    before = {p: p.read_text() for p in (out / "data").rglob("*.jsonl")}
    again = run_sweep(load_grid(tmp_path / "grid.yaml"), out, progress=False)
    assert {p: p.read_text() for p in (out / "data").rglob("*.jsonl")} == before
    assert [(r.model_id, r.score) for r in again] == [(r.model_id, r.score) for r in results]
