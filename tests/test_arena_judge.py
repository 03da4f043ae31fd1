"""The Arena Hard judge's failure paths and its local backend.

Endpoint failures run against a small HTTP server on 127.0.0.1 that stands in for a hosted judge
(gpt-4-1106-preview cannot be reached here): it answers each game with a verdict, or hangs on one
question. The local judge is a real tiny transformer on the HF backend.
"""

from __future__ import annotations

import json
import socket

import pytest

from benchmarks.arena_hard.formats import read_questions
from benchmarks.arena_hard.judge import judge_answers, load_judge_config
from conftest import SHARED
from actors.errors import BackendError, ConfigError
from scripted_server import ScriptedServer

ARENA = SHARED / "arena-hard-v0.1"
ANSWERS = ARENA / "model_answer" / "gpt-3.5-turbo-0125.jsonl"
BASELINE = ARENA / "model_answer" / "gpt-4-0314.jsonl"


@pytest.fixture(scope="module")
def questions():
    return read_questions(ARENA / "question.jsonl")[:2]


def judge_server(hang_on: str | None = None) -> ScriptedServer:
    """Answers every chat completion with `[[A>B]]`, except that a game about `hang_on` never answers."""

    def respond(body):
        if hang_on and any(hang_on in m["content"] for m in body["messages"]):
            return None
        reply = {
            "id": "j", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "My final verdict is: [[A>B]]"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        return 200, reply, {}, 0

    return ScriptedServer(respond)


def endpoint_judge(url: str, **endpoint):
    return load_judge_config({"model": "judge", "endpoint": {"base_url": url, "timeout_s": 1.0, "max_retries": 0, **endpoint}})


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_hanging_judge_fails_with_its_timeout_and_keeps_what_was_judged(questions, tmp_path):
    hung = judge_server(hang_on=questions[1].prompt[:60])
    try:
        with pytest.raises(BackendError, match=r"failed after \d+ attempts: no answer within endpoint.timeout_s=1.0s"):
            judge_answers(endpoint_judge(hung.url), questions, ANSWERS, BASELINE, tmp_path, progress=False)
    finally:
        hung.close()
    out = tmp_path / "gpt-3.5-turbo-0125.jsonl"
    assert [r["question_id"] for r in rows(out)] == [questions[0].id]  # the finished question is on disk
    working = judge_server()
    try:
        judge_answers(endpoint_judge(working.url), questions, ANSWERS, BASELINE, tmp_path, progress=False)
    finally:
        working.close()
    assert len(working.requests) == 2  # only the missing question's two games
    assert sorted(r["question_id"] for r in rows(out)) == sorted(q.id for q in questions)
    assert all(g["score"] == "A>B" for r in rows(out) for g in r["games"])


def test_a_judge_endpoint_that_is_down_is_named(questions, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    with pytest.raises(BackendError, match=rf"endpoint http://127.0.0.1:{port}/v1 \(judge\) failed after \d+ attempts: APIConnectionError: unreachable"):
        judge_answers(endpoint_judge(f"http://127.0.0.1:{port}/v1"), questions, ANSWERS, BASELINE, tmp_path, progress=False)
    assert not (tmp_path / "gpt-3.5-turbo-0125.jsonl").exists()


def test_a_missing_api_key_is_named_before_any_call(questions, tmp_path, monkeypatch):
    monkeypatch.delenv("FESCALE_TEST_JUDGE_KEY", raising=False)
    cfg = endpoint_judge("http://127.0.0.1:9/v1", api_key_env="FESCALE_TEST_JUDGE_KEY")
    with pytest.raises(ConfigError, match=r"needs an API key in \$FESCALE_TEST_JUDGE_KEY"):
        judge_answers(cfg, questions, ANSWERS, BASELINE, tmp_path, progress=False)


def test_judge_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="continuation_prefix needs a local judge"):
        load_judge_config({"continuation_prefix": "[["})
    with pytest.raises(ConfigError, match="`temprature`"):
        load_judge_config({"temprature": 0})
    with pytest.raises(ConfigError, match="does not exist"):
        load_judge_config(tmp_path / "nope.yaml")


def test_a_local_judge_continues_from_its_prefix(questions, tiny_model, tmp_path):
    """A random tiny model writes no label: every game gets its continuation, which starts with the prefix."""
    prefix = "My final verdict is: [["
    cfg = load_judge_config({"backend": "hf", "model": tiny_model, "name": "tiny", "max_tokens": 6, "threads": 1, "max_model_len": 4096, "continuation_prefix": prefix})
    out = judge_answers(cfg, questions, ANSWERS, BASELINE, tmp_path, progress=False)
    judged = rows(out)
    assert sorted(r["question_id"] for r in judged) == sorted(q.id for q in questions)
    for game in (g for r in judged for g in r["games"]):
        assert game["score"] is not None or prefix in game["judgment"]
        assert "<|User Prompt|>" in game["user_prompt"]
