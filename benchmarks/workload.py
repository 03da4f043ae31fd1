"""The work the performance benchmarks measure, and the raw-backend baseline they measure it against.

`prompts` makes any number of distinct prompts from a prompt file. `run_flat` is the baseline: the
same method steps as the engine, but over a backend built in this process (no Ray, no Ray Data, no
actor calls), one stage at a time with every prompt of the stage in flight at once, so the backend
sees one flat batch per stage: the best a hand-written batch script can do with that backend.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

import msgspec

from actors.backend import Backend, ChatRequest, ChatResult, ClassifyRequest, NextTokenRequest, ScoreResult
from engine.config import FescaleConfig
from engine.inputs import DEMO_PROMPTS, Prompt, read_prompts
from engine.rows import PromptState
from engine.runner import new_states
from engine.steps import Step

# --quick: shorter answers and fewer feedback, same stages (what a benchmark run under 3 minutes does)
QUICK = ["generate.max_tokens=48", "feedback.plan=2@0.7", "feedback.max_tokens=32", "edit.max_tokens=48"]


def prompts(count: int, path: str | Path = DEMO_PROMPTS) -> list[Prompt]:
    """`count` prompts cycling through the file's, each with its own id (`<id>#<round>` after the first round)."""
    base, _ = read_prompts(path)
    if not base:
        raise SystemExit(f"{path}: no valid prompts")
    return [replace(p, id=p.id if k < len(base) else f"{p.id}#{k // len(base)}") for k, p in ((k, base[k % len(base)]) for k in range(count))]


class DirectClient:
    """A role client that awaits the backend in this process (the `PoolClient` surface, without Ray).

    `per_sample_prompt_tokens` counts the prompt tokens a naive implementation would prefill: every
    sample's whole prompt, once per sample (what the prefix-sharing benchmark compares against).
    """

    def __init__(self, backend: Backend, split_fanout: bool = False):
        self.backend = backend
        self.split_fanout = split_fanout
        self.per_sample_prompt_tokens = 0

    async def chat(self, requests: list[ChatRequest]) -> list[ChatResult]:
        """With `split_fanout`, each request of n samples goes as n requests of one (no `n` fan-out)."""
        if not self.split_fanout:
            results = await self.backend.chat(requests)
            self.per_sample_prompt_tokens += sum(res.prompt_tokens * req.sampling.n for req, res in zip(requests, results))
            return results
        singles = [msgspec.structs.replace(r, sampling=msgspec.structs.replace(r.sampling, n=1)) for r in requests for _ in range(r.sampling.n)]
        parts = iter(await self.backend.chat(singles))
        merged = []
        for r in requests:
            mine = [next(parts) for _ in range(r.sampling.n)]
            merged.append(ChatResult([c for p in mine for c in p.completions], sum(p.prompt_tokens for p in mine)))
        self.per_sample_prompt_tokens += sum(res.prompt_tokens for res in merged)
        return merged

    async def next_token_logprobs(self, requests: list[NextTokenRequest]) -> list[ScoreResult]:
        results = await self.backend.next_token_logprobs(requests)
        self.per_sample_prompt_tokens += sum(r.prompt_tokens for r in results)
        return results

    async def classify(self, requests: list[ClassifyRequest]) -> list[ScoreResult]:
        results = await self.backend.classify(requests)
        self.per_sample_prompt_tokens += sum(r.prompt_tokens for r in results)
        return results


async def run_flat(cfg: FescaleConfig, steps: list[Step], batch: list[Prompt]) -> tuple[list[PromptState], float]:
    """`steps` over `batch`, stage after stage, all prompts of a stage at once; (states, seconds)."""
    states = new_states(cfg, batch)
    started = time.perf_counter()
    for step in steps:
        await asyncio.gather(*(step.run(s) for s in states))
    return states, time.perf_counter() - started


def generated_tokens(states: list[PromptState]) -> int:
    return sum(u.completion_tokens for s in states for u in s.usage.values())
