"""The OpenAI-compatible backend against real HTTP servers on 127.0.0.1.

- A real vLLM OpenAI server (`vllm serve`, CPU) with the embedded SmolLM2: chat with n, the
  assistant prefix, logprob scores, and the whole pipeline with every role on the endpoint.
- A scripted HTTP server for failure handling. It stands in for a hosted API's failures (5xx, 429,
  malformed bodies, hangs, auth errors), which cannot be produced on demand by a real hosted API here.
"""

import asyncio
import os
import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from actors.backend import BackendSpec, ChatRequest, NextTokenRequest, Sampling
from actors.hf_backend import HFBackend
from actors.openai_backend import OpenAIBackend
from conftest import make_config
from actors.errors import BackendError, ConfigError, RequestError
from engine.inputs import Prompt
from engine.runner import execute
from engine.sinks import JsonlSink
from engine.summary import Summary
from scripted_server import ScriptedServer

Q = ({"role": "user", "content": "What is the capital of France?"},)
COMPLETION = {
    "id": "c1", "object": "chat.completion", "created": 0, "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spec(base_url, **endpoint):
    return BackendSpec(backend="openai", model="m", endpoint={"base_url": base_url, "timeout_s": 2.0, "max_retries": 2, **endpoint})


def scripted(script) -> ScriptedServer:
    """Answers each POST with the next scripted (status, body, headers, delay); a completion after the script."""
    script = list(script)
    return ScriptedServer(lambda body: script.pop(0) if script else (200, COMPLETION, {}, 0))


def chat(backend, n=1):
    return asyncio.run(backend.chat([ChatRequest(Q, Sampling(n=n, max_tokens=4))]))


def test_transient_failures_are_retried_then_succeed():
    server = scripted([(500, {"error": {"message": "boom"}}, {}, 0), (429, {"error": {"message": "slow down"}}, {"Retry-After": "0"}, 0)])
    try:
        [res] = chat(OpenAIBackend(spec(server.url)))
        assert res.completions[0].text == "Paris." and res.prompt_tokens == 9 and res.completions[0].tokens == 2
        assert len(server.requests) == 3
    finally:
        server.close()


@pytest.mark.parametrize(
    "script, needle",
    [
        ([(503, {"error": {"message": "overloaded"}}, {}, 0)] * 3, "failed after 3 attempts: InternalServerError: overloaded"),
        ([(200, "this is not json", {}, 0)] * 3, "failed after 3 attempts"),
        ([(200, {"id": "x", "object": "chat.completion", "choices": []}, {}, 0)] * 3, "MalformedResponse"),
        ([(200, COMPLETION, {}, 3.0)] * 3, "failed after 3 attempts: no answer within endpoint.timeout_s="),
    ],
)
def test_persistent_failures_end_in_an_error_naming_the_endpoint(script, needle):
    server = scripted(script)
    try:
        with pytest.raises(BackendError) as err:
            chat(OpenAIBackend(spec(server.url)))
        assert server.url in str(err.value) and needle in str(err.value)
        assert len(server.requests) == 3
    finally:
        server.close()


@pytest.mark.parametrize(
    "status, body, error, needle",
    [
        (413, "<html>\n<h1>413 Request Entity Too Large</h1>\n</html>", RequestError, "rejected the request: <html> <h1>413 Request Entity Too Large</h1> </html> (HTTP 413)"),
        (422, {"detail": [{"loc": ["body", "messages"], "msg": "field required"}]}, RequestError, "rejected the request: [{'loc'"),
        (400, {"error": {"message": "prompt too long"}}, RequestError, "rejected the request: prompt too long (HTTP 400)"),
        (400, {"error": "context too long"}, RequestError, "rejected the request: context too long (HTTP 400)"),
        (401, {"error": {"message": "bad key"}}, BackendError, "HTTP 401: bad key"),
        (403, {"error": {"message": "forbidden"}}, BackendError, "HTTP 403: forbidden"),
        (404, {"error": {"message": "no model m"}}, BackendError, "HTTP 404: no model m"),
    ],
)
def test_client_errors_are_not_retried_and_only_the_requests_own_fail_just_its_prompt(status, body, error, needle):
    """413/422/400 are this request's fault (a batch job records it and goes on); 401/403/404 (a wrong
    key, URL or model) would fail every prompt, so they stay a BackendError. Neither is retried."""
    server = scripted([(status, body, {}, 0)])
    try:
        with pytest.raises(error) as raised:
            chat(OpenAIBackend(spec(server.url)))
        assert type(raised.value) is error and needle in str(raised.value) and "\n" not in str(raised.value)
        assert len(server.requests) == 1
    finally:
        server.close()


def test_request_timeout_and_conflict_are_retried():
    server = scripted([(408, {"error": {"message": "slow"}}, {}, 0), (409, {"error": {"message": "busy"}}, {}, 0)])
    try:
        [res] = chat(OpenAIBackend(spec(server.url)))
        assert res.completions[0].text == "Paris." and len(server.requests) == 3
    finally:
        server.close()


def test_an_endpoint_that_is_down_fails_fast():
    started = time.monotonic()
    with pytest.raises(BackendError, match="failed after 3 attempts: APIConnectionError"):
        chat(OpenAIBackend(spec(f"http://127.0.0.1:{free_port()}/v1")))
    assert time.monotonic() - started < 10


def test_missing_api_key_env_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("FESCALE_TEST_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"needs an API key in \$FESCALE_TEST_KEY .* not set"):
        OpenAIBackend(spec("http://127.0.0.1:1/v1", api_key_env="FESCALE_TEST_KEY"))


def test_concurrency_is_bounded():
    server = scripted([(200, COMPLETION, {}, 0.3)] * 6)
    try:
        backend = OpenAIBackend(spec(server.url, max_concurrency=2))
        started = time.monotonic()
        asyncio.run(backend.chat([ChatRequest(Q, Sampling(max_tokens=4))] * 6))
        assert time.monotonic() - started >= 0.85  # 6 calls of 0.3 s, 2 at a time: 3 waves
    finally:
        server.close()


@pytest.fixture(scope="module")
def vllm_server(embedded_dir):
    port = free_port()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", embedded_dir, "--served-model-name", "smol",
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
        "--kv-cache-memory-bytes", str(512 * 1024 * 1024), "--seed", "0",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0-1"})
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/models", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(2)
    else:
        proc.kill()
        raise RuntimeError("vllm serve did not start within 300 s")
    yield url
    proc.terminate()
    proc.wait(timeout=60)


@pytest.mark.slow
def test_real_vllm_server_chat_prefix_and_scores(vllm_server, embedded_dir):
    backend = OpenAIBackend(BackendSpec(backend="openai", model="smol", endpoint={"base_url": vllm_server}))
    [res] = asyncio.run(backend.chat([ChatRequest(Q, Sampling(n=2, temperature=0.7, top_p=0.9, max_tokens=8))]))
    assert len(res.completions) == 2 and res.prompt_tokens > 0 and sum(c.tokens for c in res.completions) > 0
    [plain, prefixed] = asyncio.run(backend.chat([ChatRequest(Q, Sampling(max_tokens=4)), ChatRequest(Q, Sampling(max_tokens=4), prefix="The capital is")]))
    assert prefixed.prompt_tokens > plain.prompt_tokens  # the prefix is part of the prompt, continued, not repeated
    request = NextTokenRequest(Q, (" not", " mostly"), prefix="The response is")
    [remote] = asyncio.run(backend.next_token_logprobs([request]))
    [local] = asyncio.run(HFBackend(BackendSpec(backend="hf", model=embedded_dir)).next_token_logprobs([request]))
    assert remote.scores[0] == pytest.approx(local.scores[0], abs=0.05)  # " not" is in the top-20 here


@pytest.mark.slow
def test_pipeline_with_every_role_on_an_openai_endpoint(ray_session, vllm_server, tmp_path):
    role = {"model": "smol", "backend": "openai", "endpoint": {"base_url": vllm_server, "max_concurrency": 8}}
    cfg = make_config(
        "smol", roles={"generator": role}, generate={"num_responses": 2, "max_tokens": 12},
        feedback={"plan": "2@0.7", "max_tokens": 10, "guided_level": True}, edit={"max_tokens": 12},
    )
    items = [Prompt(id="p0", messages=list(Q), line=1), Prompt(id="p1", messages=[{"role": "user", "content": "Name a fruit."}], line=2)]
    summary = Summary(cfg.mode, cfg.config_hash())
    execute(cfg, items, JsonlSink(tmp_path / "out.jsonl", []), summary, progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
    assert sorted(r["id"] for r in rows) == ["p0", "p1"] and all(r["final"] for r in rows)
    assert summary.feedback == 8 and summary.tokens["generate"]["completion_tokens"] > 0


def test_stop_and_seed_are_sent_only_when_asked():
    server = scripted([])
    try:
        backend = OpenAIBackend(spec(server.url))
        asyncio.run(backend.chat([ChatRequest(Q, Sampling(max_tokens=4, stop=("5", "\n\n"), seed=3))]))
        chat(backend)
        asked, plain = server.requests
        assert (asked["stop"], asked["seed"]) == (["5", "\n\n"], 3)
        assert "stop" not in plain and "seed" not in plain  # an endpoint that takes neither still works unasked
    finally:
        server.close()
