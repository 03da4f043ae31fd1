"""A backend whose model costs nothing: canned answers at once, for measuring the engine alone.

`InstantBackend` answers like a model would in shape and size (n completions per request of about
60 words, feedback that starts "The response is mostly helpful. However, ..." so the filter keeps
it, fixed next-token scores, plausible token counts) but spends no time on them. It runs behind the
same replica actors and Ray Data stages as a real model, named by import path in a role:

    generator: {model: embedded, backend: benchmarks.instant_backend:InstantBackend, num_cpus: 0.5}

(`benchmarks.engine_overhead:InstantBackend` names the same class). The model path is only checked
to exist, never loaded. `engine_kwargs: {repeat: K}` makes every text K times as long (Arena-Hard
answers run to several hundred words: the engine's per-byte costs grow with them). `info()` (the replica's `ready()`) reports what it was asked: calls and
requests per kind, completions, seconds spent inside its methods, and when each prompt's calls
arrived (a prompt is recognised by the `[req:ID]` tag that `tagged` puts in its text).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from actors.backend import Backend, BackendSpec, ChatRequest, ChatResult, ClassifyRequest, Completion, NextTokenRequest, ScoreResult
from engine import templates

TAG = "[req:"
_FILLER = (
    "gives a clear answer to the question, explains the main idea in plain words, names the one "
    "assumption it relies on, adds a short example that a reader can check by hand, and ends with a "
    "sentence on when the answer would change and what to look at in that case"
)
TEXTS = {
    "response": f"Here is the answer. It {_FILLER}.",
    "feedback": "The response is mostly helpful. However, it could improve by stating its assumption first; it lacks a "
    "worked example with numbers, and the reader would benefit from a shorter closing sentence, but the core "
    "explanation is correct and well ordered, and the answer follows the prompt's request for a short reply.",
    "edit": f"Here is the improved answer. It states its assumption first, {_FILLER}.",
}
TOKENS = {kind: round(len(text.split()) * 1.3) for kind, text in TEXTS.items()}  # ~1.3 tokens per English word
KINDS = ("response", "feedback", "edit", "select")
_ANY = "all"  # `calls[_ANY]`: every call; `calls[kind]`: the calls that held a request of that kind


def tagged(prompt_id: str, text: str) -> str:
    """A prompt text that the backend can attribute its calls to."""
    return f"{text} {TAG}{prompt_id}]"


def prompt_tag(messages: tuple[dict, ...]) -> str | None:
    content = messages[0]["content"] if messages else ""
    start = content.rfind(TAG)
    if start < 0:
        return None
    end = content.find("]", start)
    return content[start + len(TAG) : end] if end > 0 else None


def request_kind(messages: tuple[dict, ...]) -> str:
    """Which step asked: the last user turn is the feedback or edit instruction, else it is the prompt."""
    last = messages[-1]["content"] if messages else ""
    if last.startswith(templates.FEEDBACK[:40]):
        return "feedback"
    if last.startswith(templates.EDIT[:30]) or last.startswith(templates.EDIT_WITHOUT_FEEDBACK[:30]):
        return "edit"
    return "response"


def prompt_tokens(messages: tuple[dict, ...]) -> int:
    return sum(len(m["content"]) for m in messages) // 4 + 4 * len(messages)  # ~4 characters per token


class InstantBackend(Backend):
    def __init__(self, spec: BackendSpec):
        self.spec = spec
        repeat = int(spec.engine_kwargs.get("repeat", 1))
        self.texts = {kind: " ".join([text] * repeat) for kind, text in TEXTS.items()}  # feedback still starts with its level
        self.tokens = {kind: TOKENS[kind] * repeat for kind in TEXTS}
        self.calls: Counter = Counter()  # model calls (one `chat`/`next_token_logprobs` of a replica), in all and per kind
        self.requests: Counter = Counter()
        self.completions = 0
        self.busy_s = 0.0  # inside this backend's methods: what a model would have spent
        self.arrivals: dict[str, dict[str, float]] = {}  # prompt tag -> kind -> time.time() of its first call

    def _seen(self, kinds: list[str], requests: list) -> None:
        """Book one call: the pool merges the calls of many prompts and steps, so each request counts on its own."""
        self.calls[_ANY] += 1
        now = time.time()
        for kind in set(kinds):
            self.calls[kind] += 1
        for kind, r in zip(kinds, requests):
            self.requests[kind] += 1
            tag = prompt_tag(r.messages)
            if tag is not None:
                self.arrivals.setdefault(tag, {}).setdefault(kind, now)

    async def chat(self, requests: list[ChatRequest]) -> list[ChatResult]:
        started = time.perf_counter()
        results, kinds = [], []
        for r in requests:
            kind = request_kind(r.messages)
            kinds.append(kind)
            limit = r.sampling.max_tokens
            finish = "length" if self.tokens[kind] > limit else "stop"
            # a new string per completion, as a model's would be (no shared objects for pickle to dedupe)
            completions = [Completion(f"{self.texts[kind]} ({k})", min(self.tokens[kind], limit), finish) for k in range(r.sampling.n)]
            results.append(ChatResult(completions, prompt_tokens(r.messages)))
            self.completions += len(completions)
        if requests:
            self._seen(kinds, requests)
        self.busy_s += time.perf_counter() - started
        return results

    async def next_token_logprobs(self, requests: list[NextTokenRequest]) -> list[ScoreResult]:
        started = time.perf_counter()
        results = [ScoreResult([-0.25 - 0.5 * k for k in range(len(r.choices))], prompt_tokens(r.messages)) for r in requests]
        if requests:
            self._seen(["select"] * len(requests), requests)
        self.busy_s += time.perf_counter() - started
        return results

    async def classify(self, requests: list[ClassifyRequest]) -> list[ScoreResult]:
        started = time.perf_counter()
        results = [ScoreResult([0.5], prompt_tokens(r.messages)) for r in requests]
        if requests:
            self._seen(["select"] * len(requests), requests)
        self.busy_s += time.perf_counter() - started
        return results

    def info(self) -> dict[str, Any]:
        return {
            "backend": "instant",
            "calls": dict(self.calls),
            "requests": dict(self.requests),
            "completions": self.completions,
            "busy_s": self.busy_s,
            "arrivals": self.arrivals,
        }
