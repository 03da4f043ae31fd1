"""OpenAI-compatible HTTP backend: a vLLM server, a hosted API, or fescale's own Serve app.

Bounded concurrency (a semaphore per replica), a timeout per call, retries with exponential
backoff and jitter on transient failures (connection errors, timeouts, 429 honouring Retry-After,
5xx, malformed responses), then a `BackendError` naming the endpoint and the last error. A 4xx
that is the request's own fault (400, 413 payload too large, 422: e.g. a prompt over the context)
is a `RequestError`: it fails that request only, where a batch job goes on with the others.

Two things an HTTP API only approximates, documented where they are used:
- per-completion token counts: the usage total is split evenly over the n completions;
- next-token scores: read from `top_logprobs` (at most 20); a choice outside them gets the lowest
  returned log-prob (an upper bound on its true value).
An assistant prefix is sent as a final assistant message with vLLM's `continue_final_message`.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from typing import Any

import openai

from actors.backend import Backend, BackendSpec, ChatRequest, ChatResult, Completion, NextTokenRequest, ScoreResult
from actors.errors import BackendError, ConfigError, RequestError

TOP_LOGPROBS = 20


class MalformedResponse(Exception):
    """The endpoint answered 200 with something that is not a chat completion."""


_TRANSIENT = (
    openai.APIConnectionError,  # includes timeouts
    openai.RateLimitError,
    openai.InternalServerError,
    openai.APIResponseValidationError,
    json.JSONDecodeError,  # the openai client lets a non-JSON 200 body through as this
    MalformedResponse,
)
RETRIED_STATUS = {408, 409}  # request timeout, conflict: transient too (the openai client's own rule)
# The request's own fault: bad or unprocessable (400, 422), too large (413). Only its prompt fails;
# 401/403/404 (a wrong key, URL or model) stay a BackendError: they fail every prompt alike.
REQUEST_FAULT = {400, 413, 422}


class OpenAIBackend(Backend):
    def __init__(self, spec: BackendSpec):
        if spec.kind != "causal":  # the config refuses this at load (LOCAL_SCORERS); a hand-made spec lands here
            raise ConfigError(
                f"backend openai cannot serve kind {spec.kind}: an OpenAI-compatible endpoint returns neither classifier "
                "head scores nor raw logits; run the reward model on backend hf or vllm"
            )
        ep = spec.endpoint or {}
        self.spec = spec
        self.base_url = ep["base_url"]
        self.max_retries = ep.get("max_retries", 3)
        self.max_concurrency = ep.get("max_concurrency", 16)
        self.timeout_s = ep.get("timeout_s", 120.0)
        key_env = ep.get("api_key_env")
        self.api_key = os.environ.get(key_env, "") if key_env else "EMPTY"
        if key_env and not self.api_key:
            raise ConfigError(f"endpoint {self.base_url} needs an API key in ${key_env} (api_key_env), which is not set; set it")
        self._loop: asyncio.AbstractEventLoop | None = None

    def _session(self) -> tuple[openai.AsyncOpenAI, asyncio.Semaphore]:
        """The HTTP client and concurrency bound of the running event loop (both are bound to one)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            self._client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, timeout=self.timeout_s, max_retries=0)
            self._semaphore = asyncio.Semaphore(self.max_concurrency)
        return self._client, self._semaphore

    def info(self) -> dict[str, Any]:
        return {"backend": "openai", "base_url": self.base_url, "model": self.spec.model}

    async def chat(self, requests: list[ChatRequest]) -> list[ChatResult]:
        return list(await asyncio.gather(*(self._chat(r) for r in requests)))

    async def next_token_logprobs(self, requests: list[NextTokenRequest]) -> list[ScoreResult]:
        return list(await asyncio.gather(*(self._next_token(r) for r in requests)))

    async def _chat(self, req: ChatRequest) -> ChatResult:
        s = req.sampling
        body = self._body(req.messages, req.prefix)
        asked = {"stop": list(s.stop) if s.stop else None, "seed": s.seed}  # sent only when set: not every endpoint takes them
        resp = await self._create(
            **body,
            n=s.n,
            temperature=s.temperature,
            top_p=s.top_p if s.temperature > 0 else 1.0,
            max_tokens=s.max_tokens,
            **{k: v for k, v in asked.items() if v is not None},
        )
        choices = sorted(resp.choices, key=lambda c: c.index)
        usage = resp.usage
        total = usage.completion_tokens if usage else 0
        share = [total // len(choices) + (1 if i < total % len(choices) else 0) for i in range(len(choices))]
        completions = [
            Completion(c.message.content or "", share[i], "length" if c.finish_reason == "length" else "stop")
            for i, c in enumerate(choices)
        ]
        return ChatResult(completions=completions, prompt_tokens=usage.prompt_tokens if usage else 0)

    async def _next_token(self, req: NextTokenRequest) -> ScoreResult:
        body = self._body(req.messages, req.prefix)
        resp = await self._create(**body, max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=TOP_LOGPROBS)
        content = resp.choices[0].logprobs.content if resp.choices[0].logprobs else None
        if not content:
            raise BackendError(f"endpoint {self.base_url} returned no logprobs; the logit judge needs logprobs support")
        top = {}
        for entry in content[0].top_logprobs:
            top.setdefault(entry.token.strip(), entry.logprob)
        floor = min(top.values())
        scores = [top.get(choice.strip(), floor) for choice in req.choices]
        return ScoreResult(scores=scores, prompt_tokens=resp.usage.prompt_tokens if resp.usage else 0)

    def _body(self, messages: tuple[dict, ...], prefix: str) -> dict[str, Any]:
        msgs = list(messages)
        extra = dict(self.spec.engine_kwargs)
        if prefix:
            msgs.append({"role": "assistant", "content": prefix})
            extra.update(continue_final_message=True, add_generation_prompt=False)
        return {"model": self.spec.model, "messages": msgs, "extra_body": extra or None}

    async def _create(self, **kwargs):
        client, semaphore = self._session()
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            try:
                async with semaphore:
                    resp = await client.chat.completions.create(**kwargs)
                if not getattr(resp, "choices", None):
                    raise MalformedResponse(f"not a chat completion: {str(resp)[:200]!r}")
                return resp
            except (openai.APIStatusError, *_TRANSIENT) as e:
                status = getattr(e, "status_code", None)
                if status in REQUEST_FAULT:
                    raise RequestError(f"endpoint {self.base_url} rejected the request: {_message(e)} (HTTP {status})") from None
                if not isinstance(e, _TRANSIENT) and status not in RETRIED_STATUS:  # 401/403/404 ...: retrying will not help
                    raise BackendError(f"endpoint {self.base_url} ({self.spec.model}): HTTP {status}: {_message(e)}") from None
                last = e
                if attempt == self.max_retries:
                    break
                await asyncio.sleep(_backoff(attempt, e))
        raise BackendError(f"endpoint {self.base_url} ({self.spec.model}) failed after {self.max_retries + 1} attempts: {self._why(last)}")

    def _why(self, error: Exception | None) -> str:
        """The last failure, with what to change where there is something to change."""
        if isinstance(error, openai.APITimeoutError):
            return f"no answer within endpoint.timeout_s={self.timeout_s}s; raise the timeout or lower endpoint.max_concurrency"
        if isinstance(error, openai.APIConnectionError):
            return f"APIConnectionError: unreachable ({error.__cause__ or _message(error)})"
        return f"{type(error).__name__}: {_message(error)}"


def _backoff(attempt: int, error: Exception) -> float:
    """Exponential backoff with full jitter; a 429's Retry-After header wins when present."""
    response = getattr(error, "response", None)
    retry_after = response.headers.get("retry-after") if response is not None else None
    if retry_after:
        try:
            return min(float(retry_after), 60.0)
        except ValueError:
            pass
    return random.uniform(0, min(0.5 * 2**attempt, 10.0))


def _message(error: Exception | None) -> str:
    """The endpoint's own message, on one line and short (an HTML error page from a proxy is not)."""
    body = getattr(error, "body", None)  # the openai client's parsed body (its "error" object), or the raw text
    text: object = body if isinstance(body, str) and body.strip() else error
    if isinstance(body, dict):
        inner = body.get("error")
        text = body.get("message") or (inner.get("message") if isinstance(inner, dict) else inner) or body.get("detail") or body
    return " ".join(str(text).split())[:300]
