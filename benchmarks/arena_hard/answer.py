"""Answer Arena Hard questions with any fescale config, into arena-hard-auto's answer files.

Each question runs through the config's method steps (`engine.steps`, the code the batch pipeline
and the Serve app share) on the config's role pools, `concurrency` questions at a time, so the pools
batch their calls as in `fescale run`. Running one question's steps as one task is what gives each
answer its own latency (the streaming batch pipeline interleaves prompts across stages and has no
per-prompt clock). Per answer the row records `token_len` (the final text, counted by the
generator's own tokenizer) and, under `fescale`, every token the system spent on it and its latency.

Rows are appended as they finish; a rerun skips the questions already in the file. A question a
stage rejects (e.g. longer than the model's context) goes to `<model_id>.errors.jsonl`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.arena_hard.formats import Answer, ITSCost, Question, append_jsonl, iter_jsonl
from engine.config import FescaleConfig
from actors.errors import ConfigError, RequestError
from engine.rows import Message, PromptState, RowError
from engine.steps import build_steps, run_steps
from engine.summary import Summary

log = logging.getLogger("fescale")


@dataclass(frozen=True)
class AnswerRun:
    path: Path  # the answer file
    answered: int  # new answers written by this run
    resumed: int  # already in the file, skipped
    failed: int  # rejected by a stage, see the errors file
    summary: Summary


def answered_ids(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    return {str(row.get("question_id", row.get("uid"))) for _, row in iter_jsonl(path)}


def load_tokenizer(cfg: FescaleConfig, tokenizer: str | None = None):
    """The tokenizer that counts `token_len`: `tokenizer` (a local folder) or the generator's model."""
    from transformers import AutoTokenizer

    from actors.models import resolve_model

    generator = cfg.roles.get("generator")
    if tokenizer is None and generator.backend == "openai":
        raise ConfigError(
            f"the generator is the endpoint model {generator.model!r}: pass --tokenizer with a local tokenizer "
            "folder to count answer tokens"
        )
    return AutoTokenizer.from_pretrained(resolve_model(tokenizer or generator.model, "tokenizer"))


def answer_questions(
    cfg: FescaleConfig,
    questions: list[Question],
    model_id: str,
    out_dir: Path,
    *,
    tokenizer: str | None = None,
    concurrency: int | None = None,
    pools=None,
    progress: bool = True,
) -> AnswerRun:
    """Answer the questions not yet in `out_dir/<model_id>.jsonl`; starts (and stops) the config's
    pools unless running `pools` (an `engine.pools.Pools` covering the config's roles) are given."""
    from tqdm import tqdm

    from engine.pools import Pools

    out = out_dir / f"{model_id}.jsonl"
    errors = out_dir / f"{model_id}.errors.jsonl"
    done = answered_ids(out)
    todo = [q for q in questions if q.id not in done]
    summary = Summary(cfg.mode, cfg.config_hash(), resumed=len(questions) - len(todo))
    if not todo:
        summary.finish()
        return AnswerRun(out, 0, summary.resumed, 0, summary)
    tok = load_tokenizer(cfg, tokenizer)
    concurrency = concurrency or cfg.pipeline.batch_size * cfg.pipeline.max_concurrent_batches
    owned = pools is None
    if owned:
        pools = Pools(cfg)
        pools.start()
    try:
        summary.loaded()
        steps = build_steps(cfg, pools.clients().for_config(cfg))
        config_hash = cfg.config_hash()

        async def one(q: Question, gate: asyncio.Semaphore) -> tuple[Question, PromptState, float]:
            async with gate:
                state = PromptState(id=q.id, messages=[Message(role="user", content=q.prompt)], mode=cfg.mode, config_hash=config_hash)
                started = time.perf_counter()
                try:
                    await run_steps(steps, state)
                except RequestError as e:
                    state.error = RowError(stage="answer", message=str(e))
                return q, state, time.perf_counter() - started

        async def run() -> None:
            gate = asyncio.Semaphore(concurrency)
            jobs = [asyncio.ensure_future(one(q, gate)) for q in todo]
            try:
                with tqdm(total=len(todo), desc=f"answer {model_id}", unit="question", disable=not progress) as bar:
                    for finished in asyncio.as_completed(jobs):
                        q, state, latency = await finished
                        summary.add([state])
                        if state.error is not None:
                            append_jsonl(errors, {"question_id": q.id, **state.error.to_dict()})
                        else:
                            append_jsonl(out, to_answer(q, state, model_id, latency, tok).to_row())
                        bar.update(1)
            finally:
                for job in jobs:
                    job.cancel()
                await asyncio.gather(*jobs, return_exceptions=True)

        asyncio.run(run())
    finally:
        summary.finish()
        if owned:
            pools.shutdown()
    return AnswerRun(out, summary.prompts, summary.resumed, summary.failed, summary)


def to_answer(q: Question, state: PromptState, model_id: str, latency_s: float, tokenizer) -> Answer:
    usage = state.usage.values()
    cost = ITSCost(
        tokens=sum(u.prompt_tokens + u.completion_tokens for u in usage),
        generated_tokens=sum(u.completion_tokens for u in usage),
        latency_s=latency_s,
        mode=state.mode,
        config_hash=state.config_hash,
    )
    text = state.final or ""
    token_len = len(tokenizer.encode(text, add_special_tokens=False))
    return Answer(q.id, model_id, text, token_len, q.version, prompt=q.prompt, cost=cost)
