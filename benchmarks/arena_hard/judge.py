"""The pairwise judge: arena-hard-auto's prompts, games and verdict parsing, on any OpenAI-compatible
endpoint or a local model (fescale's hf or vllm backend, in this process).

Per question, two games against the baseline: game 1 shows the baseline as assistant A, game 2
swaps the positions. The conversation is arena-hard-auto's system prompt and user template (the v0.1
judge config; v2.0's creative_writing category has its own system prompt). The verdict is the
label in `[[...]]`; when the judge wrote none, it is asked once to continue ("continue your judgment
and finish by outputting a final verdict label") and the two turns are parsed together, as
arena-hard-auto's `gen_judgment.py` does (`number_of_judgment_attempts: 2`). Two different labels
give no verdict (and no retry): arena-hard-auto's `get_score`.

A local judge can start its continuation turn with `continuation_prefix` (e.g. "My final verdict is: [["),
which a small model needs to end with a label at all; the prefix is part of the recorded judgment.
The judge model, its endpoint or backend and the baseline are config (`JudgeConfig`, YAML), never code.
Each judged question is appended to `<out>/<model>.jsonl` as soon as both games are in, so a rerun
skips it; an endpoint that stays down raises `BackendError` naming it, after what was judged is on disk.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, NonNegativeFloat, PositiveInt, model_validator

from benchmarks.arena_hard.formats import Answer, Game, Judgment, Question, append_jsonl, iter_jsonl, read_answers
from engine.config import CONFIGS_DIR, EndpointConfig
from engine.config_kit import StrictModel, load
from actors.errors import BackendError, ConfigError, InputError

JUDGE_SYSTEM_PROMPT = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to the "
    "user prompt displayed below. You will be given assistant A's answer and assistant B's answer. Your job is to "
    "evaluate which assistant's answer is better.\n\nBegin your evaluation by generating your own answer to the "
    "prompt. You must provide your answers before judging any answers.\n\nWhen evaluating the assistants' answers, "
    "compare both assistants' answers with your answer. You must identify and correct any mistakes or inaccurate "
    "information.\n\nThen consider if the assistant's answers are helpful, relevant, and concise. Helpful means the "
    "answer correctly responds to the prompt or follows the instructions. Note when user prompt has any ambiguity or "
    "more than one interpretation, it is more helpful and appropriate to ask for clarifications or more information "
    "from the user than providing an answer based on assumptions. Relevant means all parts of the response closely "
    "connect or are appropriate to what is being asked. Concise means the response is clear and not verbose or "
    "excessive.\n\nThen consider the creativity and novelty of the assistant's answers when needed. Finally, identify "
    "any missing important information in the assistants' answers that would be beneficial to include when "
    "responding to the user prompt.\n\nAfter providing your explanation, you must output only one of the following "
    "choices as your final verdict with a label:\n\n1. Assistant A is significantly better: [[A>>B]]\n2. Assistant A "
    "is slightly better: [[A>B]]\n3. Tie, relatively the same: [[A=B]]\n4. Assistant B is slightly better: "
    "[[B>A]]\n5. Assistant B is significantly better: [[B>>A]]\n\nExample output: \"My final verdict is tie: [[A=B]]\"."
)
# v2.0 creative_writing: the same prompt without "generate your own answer first".
CREATIVE_WRITING_SYSTEM_PROMPT = JUDGE_SYSTEM_PROMPT.replace(
    "\n\nBegin your evaluation by generating your own answer to the prompt. You must provide your answers before "
    "judging any answers.\n\nWhen evaluating the assistants' answers, compare both assistants' answers with your answer.",
    "\n\nWhen evaluating the assistants' answers, compare both assistants' answers.",
)
PROMPT_TEMPLATE = (
    "<|User Prompt|>\n{question}\n\n<|The Start of Assistant A's Answer|>\n{answer_a}\n<|The End of Assistant A's "
    "Answer|>\n\n<|The Start of Assistant B's Answer|>\n{answer_b}\n<|The End of Assistant B's Answer|>"
)
CONTINUE_PROMPT = "continue your judgment and finish by outputting a final verdict label"
VERDICT_PATTERN = r"\[\[([AB<>=]+)\]\]"


@dataclass(frozen=True)
class Verdict:
    label: str | None  # e.g. "A>B"; None: no verdict
    retry: bool  # no label at all: ask the judge to continue (two different labels: do not)


def parse_verdict(text: str, pattern: str = VERDICT_PATTERN) -> Verdict:
    """arena-hard-auto's `get_score`: one distinct label is the verdict; none asks for a retry; two
    different labels are no verdict. A label anywhere counts (also inside a code block).

    >>> parse_verdict("My final verdict is: [[B>A]]")
    Verdict(label='B>A', retry=False)
    >>> parse_verdict("no label here"), parse_verdict("[[A>B]] ... [[B>A]]")
    (Verdict(label=None, retry=True), Verdict(label=None, retry=False))
    """
    matches = [m for m in re.findall(pattern, text) if m != ""]
    if not matches:
        return Verdict(None, True)
    if len(set(matches)) == 1:
        return Verdict(matches[0].strip("\n"), False)
    return Verdict(None, False)


class JudgeConfig(StrictModel):
    """Who judges against whom. Defaults are the paper's Arena Hard v0.1 setup."""

    backend: Literal["openai", "hf", "vllm"] = Field("openai", description="openai: `endpoint`; hf or vllm: `model` runs in this process")
    model: str = Field("gpt-4-1106-preview", description="the model name at the endpoint; for hf/vllm a local folder, a .gguf or 'embedded'")
    name: str | None = Field(None, description="the judgment directory name (model_judgment/<name>/); default `model`")
    endpoint: EndpointConfig = Field(
        default_factory=lambda: EndpointConfig(base_url="https://api.openai.com/v1", api_key_env="OPENAI_API_KEY"),
        description="any OpenAI-compatible endpoint: a hosted API, vLLM's server, `fescale serve`",
    )
    baseline: str = Field("gpt-4-0314", description="the baseline model id (its answers are --baseline-answers)")
    temperature: NonNegativeFloat = 0.0
    max_tokens: PositiveInt = 4096
    attempts: PositiveInt = Field(2, description="judge turns per game: 2 = one continuation when no verdict")
    system_prompt: str = JUDGE_SYSTEM_PROMPT
    prompt_template: str = PROMPT_TEMPLATE
    extra_body: dict = Field(default_factory=dict, description="extra request fields (e.g. fescale knobs for a fescale server)")
    continuation_prefix: str = Field("", description="hf/vllm: the continuation turn starts with this text, e.g. 'My final verdict is: [['")
    threads: PositiveInt | None = Field(None, description="hf/vllm: CPU threads of the local judge; default all cores")
    max_model_len: PositiveInt | None = Field(None, description="hf/vllm: the local judge's context; default the model's own")

    @model_validator(mode="after")
    def _check(self) -> "JudgeConfig":
        if self.continuation_prefix and self.backend == "openai":
            raise ValueError("continuation_prefix needs a local judge (backend hf or vllm): a chat API cannot prefill the answer")
        return self

    @property
    def judge_name(self) -> str:
        return self.name or self.model

    def system_prompt_for(self, question: Question) -> str:
        if question.version == "v2.0" and question.category == "creative_writing" and self.system_prompt == JUDGE_SYSTEM_PROMPT:
            return CREATIVE_WRITING_SYSTEM_PROMPT
        return self.system_prompt


def load_judge_config(source: str | Path | dict | None, overrides: Iterable[str] = ()) -> JudgeConfig:
    """A judge config from a preset in configs/judges/ (by name), a YAML file, a mapping, or None (the
    paper's gpt-4-1106-preview on OpenAI), with `key=value` overrides (`--judge-set`)."""
    return load(JudgeConfig, source, overrides, what="judge config", presets_dir=CONFIGS_DIR / "judges")


class Judge:
    """Runs the games of many questions on one judge through fescale's backend interface: the
    OpenAI-compatible backend for an endpoint (`endpoint.max_concurrency` requests at a time, its
    retries and error messages), or a local hf/vllm backend (every game in flight at once: the
    backend batches them)."""

    def __init__(self, cfg: JudgeConfig):
        from actors.backend import BackendSpec
        from actors.registry import make_backend

        self.cfg = cfg
        if cfg.backend == "openai":
            spec = BackendSpec("openai", cfg.model, endpoint=cfg.endpoint.model_dump(), engine_kwargs=cfg.extra_body)
        else:
            spec = BackendSpec(cfg.backend, cfg.model, threads=cfg.threads or os.cpu_count() or 1, max_model_len=cfg.max_model_len)
        self.backend = make_backend(spec)

    async def close(self) -> None:
        await self.backend.close()

    async def complete(self, messages: list[dict], prefix: str = "") -> str:
        """The judge's next turn (starting with `prefix`, local judges only)."""
        from actors.backend import ChatRequest, Sampling

        sampling = Sampling(1, self.cfg.temperature, 1.0, self.cfg.max_tokens)
        [result] = await self.backend.chat([ChatRequest(tuple(messages), sampling, prefix=prefix)])
        return prefix + result.completions[0].text

    async def game(self, question: Question, answer_a: str, answer_b: str) -> Game:
        """One game: the judge's turns (one continuation when no label) and the parsed verdict."""
        user_prompt = self.cfg.prompt_template.format(question=question.prompt, answer_a=answer_a, answer_b=answer_b)
        messages = [{"role": "system", "content": self.cfg.system_prompt_for(question)}, {"role": "user", "content": user_prompt}]
        judgment, verdict = "", Verdict(None, True)
        for attempt in range(self.cfg.attempts):
            text = await self.complete(messages, self.cfg.continuation_prefix if attempt else "")
            judgment += "\n" + text
            verdict = parse_verdict(judgment)
            if not verdict.retry:
                break
            messages += [{"role": "assistant", "content": text}, {"role": "user", "content": CONTINUE_PROMPT}]
        return Game(verdict.label, user_prompt, judgment)

    async def judge(self, question: Question, answer: Answer, baseline: Answer) -> Judgment:
        games = await asyncio.gather(self.game(question, baseline.text, answer.text), self.game(question, answer.text, baseline.text))
        return Judgment(question.id, answer.model, self.cfg.judge_name, tuple(games), question.version, question.category, self.cfg.baseline)


def judged_ids(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    return {str(row.get("question_id", row.get("uid"))) for _, row in iter_jsonl(path)}


def judge_answers(
    cfg: JudgeConfig,
    questions: list[Question],
    answers_path: Path,
    baseline_path: Path,
    out_dir: Path,
    progress: bool = True,
) -> Path:
    """Judge every question the model answered against the baseline into `out_dir/<model>.jsonl`
    (arena-hard-auto's judgment file); questions already in that file are skipped. Returns its path."""
    from tqdm import tqdm

    answers, baseline = read_answers(answers_path), read_answers(baseline_path)
    if not answers:
        raise InputError(f"{answers_path} has no answers to judge")
    model = next(iter(answers.values())).model
    out = out_dir / f"{model}.jsonl"
    done = judged_ids(out)
    todo = [q for q in questions if q.id in answers and q.id not in done]
    missing = [q.id for q in todo if q.id not in baseline]
    if missing:
        raise InputError(f"{baseline_path} has no baseline answer for {len(missing)} questions (e.g. {missing[0]}); give the full baseline file")

    async def run() -> None:
        judge = Judge(cfg)
        jobs = [asyncio.ensure_future(judge.judge(q, answers[q.id], baseline[q.id])) for q in todo]
        try:
            with tqdm(total=len(todo), desc=f"judge {model}", unit="question", disable=not progress) as bar:
                for finished in asyncio.as_completed(jobs):
                    append_jsonl(out, (await finished).to_row())
                    bar.update(1)
        finally:
            for job in jobs:
                job.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)
            await judge.close()

    if todo:
        asyncio.run(run())
    return out
