"""The method's steps as async functions of one prompt's state: the code every entry point shares.

A step reads and extends a `PromptState` and calls its role's model through a `ModelClient` (a
pool's client, or a backend in-process). The batch pipeline runs each step as a Ray Data stage over
many prompts at once (the pools batch the calls); the Serve app runs the same steps for one request.
`build_steps` is the plan: config -> the ordered steps the mode needs.
"""

from __future__ import annotations

import abc
import logging
import time
from collections import Counter
from typing import AsyncIterator, Callable

import msgspec

from actors.backend import ChatRequest, ChatResult, ClassifyRequest, ModelClient, NextTokenRequest, Sampling
from engine import method
from engine.config import EditConfig, FeedbackConfig, FescaleConfig, GenerateConfig, SelectConfig
from engine.rows import Candidate, Edit, Feedback, PromptState, Selected

log = logging.getLogger("fescale")
LEVEL_CHOICES = tuple(f" {level}" for level in method.LEVELS)


class Step(abc.ABC):
    name: str

    @abc.abstractmethod
    async def run(self, state: PromptState) -> None: ...


class Generate(Step):
    """N initial responses in one call (`n` fan-out: the prompt is prefilled once)."""

    name = "generate"

    def __init__(self, cfg: GenerateConfig, client: ModelClient, sampling_seed: int | None = None, is_answer: bool = False):
        """`is_answer`: the mode's answer is this step's one response (greedy), so it can be streamed."""
        self.cfg, self.client, self.sampling_seed, self.is_answer = cfg, client, sampling_seed, is_answer

    def _request(self, state: PromptState) -> ChatRequest:
        n = self.cfg.num_responses
        sampling = Sampling(n, self.cfg.temperature_for(n), self.cfg.top_p, self.cfg.max_tokens, tuple(self.cfg.stop), call_seed(self.sampling_seed, self.name))
        return ChatRequest(tuple(state.conversation()), sampling)

    def _record(self, state: PromptState, result: ChatResult) -> None:
        state.candidates = [Candidate(text=c.text, finish_reason=c.finish_reason) for c in result.completions]
        state.usage_of(self.name).add(result.prompt_tokens, result.completion_tokens)

    async def run(self, state: PromptState) -> None:
        [result] = await self.client.chat([self._request(state)])
        self._record(state, result)

    async def stream(self, state: PromptState) -> AsyncIterator[str]:
        """`run` for the answer (`is_answer`), yielding its text as the model generates it.

        With stop strings, text is held back until it cannot be the start of one: a stop string can
        only end the answer in the last delta, so all but the last delta, less the longest stop
        string's length - 1, is safe to send. The result's text is the authority for the rest."""
        hold = max((len(s) for s in self.cfg.stop), default=1) - 1
        raw, sent = "", ""
        async for item in self.client.chat_stream(self._request(state)):
            if isinstance(item, str):
                if not self.cfg.stop:
                    sent += item
                    yield item
                    continue
                if len(raw) - hold > len(sent):  # `raw`: the text before this delta
                    piece = raw[len(sent) : len(raw) - hold]
                    sent += piece
                    yield piece
                raw += item
                continue
            final = item.completions[0].text
            if final.startswith(sent):
                if final[len(sent) :]:
                    yield final[len(sent) :]
            else:  # a backend whose deltas disagree with its result: the client already has its text
                log.warning("generate: streamed text differs from the final text (%d vs %d chars)", len(sent), len(final))
            self._record(state, item)


class FeedbackStep(Step):
    """M feedback per response, one call per (response, plan item) with n = the item's count."""

    name = "feedback"

    def __init__(self, cfg: FeedbackConfig, client: ModelClient, seed: int, sampling_seed: int | None = None):
        self.cfg, self.client, self.seed, self.sampling_seed = cfg, client, seed, sampling_seed

    async def run(self, state: PromptState) -> None:
        usage = state.usage_of(self.name)
        convs = [tuple(method.with_response(state.conversation(), c.text, self.cfg.template)) for c in state.candidates]
        if self.cfg.guided_level:
            jobs = await self._guided_jobs(state, convs)
        else:
            jobs = [
                (i, "", ChatRequest(conv, self._sampling(item.count, item.temperature, i, j)))
                for i, conv in enumerate(convs)
                for j, item in enumerate(self.cfg.plan)
            ]
        results = await self.client.chat([request for *_, request in jobs])
        for (i, prefix, _), result in zip(jobs, results):
            usage.add(result.prompt_tokens, result.completion_tokens)
            for completion in result.completions:
                text = prefix + completion.text
                state.candidates[i].feedback.append(
                    Feedback(text=text, level=method.parse_level(text), keywords=method.count_keywords(text))
                )

    async def _guided_jobs(self, state: PromptState, convs: list[tuple]) -> list[tuple[int, str, ChatRequest]]:
        """Sample each feedback's level from the model's own level distribution, then prefill it."""
        scored = await self.client.next_token_logprobs([NextTokenRequest(c, LEVEL_CHOICES, prefix=method.LEVEL_PREFIX) for c in convs])
        jobs = []
        for i, (conv, score) in enumerate(zip(convs, scored)):
            state.usage_of(self.name).add(score.prompt_tokens)
            for j, item in enumerate(self.cfg.plan):
                rng = method.row_rng(self.seed, state.id, i, j)
                counts = Counter(method.sample_levels(score.scores, item.temperature, item.count, rng))
                for level in method.LEVELS:
                    if counts[level]:
                        prefix = f"{method.LEVEL_PREFIX} {level} helpful."
                        jobs.append((i, prefix, ChatRequest(conv, self._sampling(counts[level], item.temperature, i, j, level), prefix=prefix)))
        return jobs

    def _sampling(self, n: int, temperature: float, *call: object) -> Sampling:
        """No stop strings: feedback is never the answer, and a cut one would lose its explanation."""
        return Sampling(n, temperature, self.cfg.top_p, self.cfg.max_tokens, seed=call_seed(self.sampling_seed, self.name, *call))


class FilterStep(Step):
    """Drop perfectly-helpful and unparseable feedback, rerank by keywords, keep E, form sets."""

    name = "filter"

    def __init__(self, cfg: FeedbackConfig, seed: int):
        self.cfg, self.seed = cfg, seed

    async def run(self, state: PromptState) -> None:
        for i, cand in enumerate(state.candidates):
            ranked = method.rank_feedback([f.level for f in cand.feedback], [f.keywords for f in cand.feedback], self.cfg.effective)
            for j in ranked:
                cand.feedback[j].kept = True
            rng = method.row_rng(self.seed, state.id, i, "sets")
            cand.feedback_sets = method.form_sets(ranked, self.cfg.sets, self.cfg.set_size, rng)


class EditStep(Step):
    """K edits per feedback set (or per response, without feedback). No feedback left: no edit."""

    name = "edit"

    def __init__(self, cfg: EditConfig, client: ModelClient, with_feedback: bool, sampling_seed: int | None = None):
        self.cfg, self.client, self.with_feedback, self.sampling_seed = cfg, client, with_feedback, sampling_seed

    async def run(self, state: PromptState) -> None:
        k = self.cfg.edits_per_set
        base = Sampling(k, self.cfg.temperature_for(k), self.cfg.top_p, self.cfg.max_tokens, tuple(self.cfg.stop))

        def sampling(i: int, j: int | None) -> Sampling:
            return msgspec.structs.replace(base, seed=call_seed(self.sampling_seed, self.name, i, j))

        messages = state.conversation()
        jobs: list[tuple[int, int | None, ChatRequest]] = []
        for i, cand in enumerate(state.candidates):
            if not self.with_feedback:
                conv = method.with_response(messages, cand.text, self.cfg.without_feedback_template)
                jobs.append((i, None, ChatRequest(tuple(conv), sampling(i, None))))
                continue
            for j in range(len(cand.feedback_sets)):
                jobs.append((i, j, ChatRequest(tuple(edit_conversation(self.cfg, messages, cand, j)), sampling(i, j))))
        results = await self.client.chat([request for *_, request in jobs])
        for (i, j, _), result in zip(jobs, results):
            state.usage_of(self.name).add(result.prompt_tokens, result.completion_tokens)
            state.candidates[i].edits.extend(Edit(text=c.text, feedback_set=j, finish_reason=c.finish_reason) for c in result.completions)


class SelectStep(Step):
    """Score the final candidates with the reward scorer and pick the best (first on ties).

    Candidates: every edit of every response, a response that got no edit as itself, and with
    `include_originals` every unedited response too. A single candidate is chosen unscored.
    """

    name = "select"

    def __init__(self, cfg: SelectConfig, client: ModelClient | None, edit: EditConfig | None = None):
        """`edit`: the editor's config, whose prompts `select.context: edit` scores edits after."""
        self.cfg, self.client, self.edit = cfg, client, edit

    async def run(self, state: PromptState) -> None:
        pool = [
            (i, e)
            for i, cand in enumerate(state.candidates)
            for e in ([*range(len(cand.edits)), *([None] if self.cfg.include_originals else [])] if cand.edits else [None])
        ]
        texts = [state.candidates[i].text if e is None else state.candidates[i].edits[e].text for i, e in pool]
        contexts = None
        if self.cfg.context == "edit":  # each edit after the conversation it answered (the Edit RM's input)
            messages = state.conversation()
            contexts = [edit_conversation(self.edit, messages, state.candidates[i], state.candidates[i].edits[e].feedback_set) for i, e in pool]
        scores: list[float | None] = [None] if len(pool) == 1 else await self.score(state, texts, contexts)
        for (i, e), score in zip(pool, scores):
            target = state.candidates[i] if e is None else state.candidates[i].edits[e]
            target.score = score
        best = 0 if len(pool) == 1 else max(range(len(pool)), key=lambda k: (scores[k], -k))
        i, e = pool[best]
        edit = state.candidates[i].edits[e] if e is not None else None
        state.selected = Selected(response=i, feedback_set=edit.feedback_set if edit else None, edit=e, score=scores[best])
        state.final = texts[best]

    async def score(self, state: PromptState, texts: list[str], contexts: list[list[dict]] | None = None) -> list[float]:
        """Each text's reward as the answer to `state`'s conversation, or to its own of `contexts` (a
        scalar scorer's); also `fescale score`'s, one text a row."""
        usage = state.usage_of(self.name)
        messages = state.conversation()
        if self.cfg.scorer == "generative":
            return await self._knockout(state, texts)
        if self.cfg.scorer == "logit_judge":
            results = await self.client.next_token_logprobs(
                [NextTokenRequest(tuple(method.with_response(messages, t, self.cfg.judge_template)), (self.cfg.target_token,)) for t in texts]
            )
        else:
            before = contexts or [messages] * len(texts)
            results = await self.client.classify([ClassifyRequest(tuple([*c, {"role": "assistant", "content": t}])) for c, t in zip(before, texts)])
        for r in results:
            usage.add(r.prompt_tokens)
        return [r.scores[0] for r in results]

    async def _knockout(self, state: PromptState, texts: list[str]) -> list[float]:
        """Generative select in rounds of `group_size`; score = rounds survived (the winner is unique)."""
        usage = state.usage_of(self.name)
        messages = state.conversation()
        alive = list(range(len(texts)))
        survived = [0.0] * len(texts)
        greedy = Sampling(1, 0.0, 1.0, self.cfg.max_tokens)
        while len(alive) > 1:
            groups = [alive[k : k + self.cfg.group_size] for k in range(0, len(alive), self.cfg.group_size)]
            contests = [g for g in groups if len(g) > 1]
            requests = [ChatRequest(tuple(method.select_instruction(messages, [texts[c] for c in g], self.cfg.select_template)), greedy) for g in contests]
            results = iter(await self.client.chat(requests))
            alive = []
            for group in groups:
                if len(group) > 1:
                    result = next(results)
                    usage.add(result.prompt_tokens, result.completion_tokens)
                    choice = method.parse_choice(result.completions[0].text, len(group))
                    group = [group[choice if choice is not None else 0]]  # unparseable: the first stays
                alive.append(group[0])
                survived[group[0]] += 1
        return survived


def edit_conversation(cfg: EditConfig, messages: list[dict], cand: Candidate, feedback_set: int) -> list[dict]:
    """What the editor answers with an edit of `cand` from its feedback set: the prompt, the response,
    the edit instruction with that set's feedback (`train.prepare.edit_prompt` builds the same)."""
    instruction = method.edit_instruction([cand.feedback[f].text for f in cand.feedback_sets[feedback_set]], cfg.template, cfg.joiner, cfg.filler)
    return method.with_response(messages, cand.text, instruction)


def call_seed(sampling_seed: int | None, *call: object) -> int | None:
    """The seed of one sampling call of a seeded request, from the request's seed and the call's place
    in the method (step, response, feedback set): reproducible, and no two calls share their draws."""
    return None if sampling_seed is None else method.row_rng(sampling_seed, *call).getrandbits(31)


def build_steps(cfg: FescaleConfig, client_for: Callable[[str], ModelClient]) -> list[Step]:
    """The ordered steps of the config's mode (generate -> feedback -> filter -> edit -> select)."""
    spec = cfg.spec
    seed = cfg.sampling_seed
    is_answer = not spec.feedback and spec.edit == "none" and cfg.generate.num_responses == 1
    steps: list[Step] = [Generate(cfg.generate, client_for("generator"), seed, is_answer)]
    if spec.feedback:
        steps += [FeedbackStep(cfg.feedback, client_for("feedback"), cfg.seed, seed), FilterStep(cfg.feedback, cfg.seed)]
    if spec.edit != "none":
        steps.append(EditStep(cfg.edit, client_for("editor"), with_feedback=spec.edit == "with_feedback", sampling_seed=seed))
    steps.append(SelectStep(cfg.select, client_for("reward") if spec.select else None, cfg.edit))
    return steps


async def each_step(steps: list[Step], state: PromptState, text: bool = False) -> AsyncIterator[str | tuple[str, float]]:
    """Run one prompt through all steps, yielding (step name, wall seconds) after each: the Serve app
    streams its progress from here (the pipeline's stage actor runs its own loop). With `text`, a
    mode whose answer is its one generated response (greedy) also yields the answer's text deltas
    (`str`) as they are generated."""
    for step in steps:
        started = time.perf_counter()
        if text and isinstance(step, Generate) and step.is_answer:
            async for delta in step.stream(state):
                yield delta
        else:
            await step.run(state)
        yield step.name, time.perf_counter() - started


async def run_steps(
    steps: list[Step], state: PromptState, on_step: Callable[[str, float], None] | None = None
) -> PromptState:
    """Run one prompt through all steps; `on_step(name, seconds)` hears each step's wall time."""
    async for name, seconds in each_step(steps, state):
        if on_step:
            on_step(name, seconds)
    return state
