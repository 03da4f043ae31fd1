"""Hugging Face transformers backend: CPU and small GPUs; the embedded default runs on it.

transformers has no continuous batching, so the backend batches for it: calls that arrive while
the model is busy (from every pipeline stage and every prompt in flight) queue up and run as one
left-padded `generate` per (temperature, top_p, stop strings; a seeded request alone), split into
chunks of `batch_size` sequences.
Fan-out (n samples of one prompt) becomes n rows of the batch, like `num_return_sequences`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import defaultdict
from typing import Any, Callable, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GenerationConfig, StoppingCriteria, TextStreamer

from actors.backend import Backend, BackendSpec, ChatRequest, ChatResult, ClassifyRequest, Completion, NextTokenRequest, ScoreResult, check_score_token
from actors.chat_format import ChatFormatter
from actors.errors import BackendError
from actors.models import resolve_model

log = logging.getLogger("fescale")

BATCH_WAIT_S = 0.02  # how long the first request of an idle backend waits for others to join


class HFBackend(Backend):
    def __init__(self, spec: BackendSpec):
        torch.set_num_threads(spec.threads)
        torch.manual_seed(spec.seed)
        self.spec = spec
        self.device = torch.device("cuda" if spec.num_gpus else "cpu")
        path = resolve_model(spec.model)
        kwargs: dict[str, Any] = {"dtype": torch.float32 if self.device.type == "cpu" else "auto"}
        kwargs.update(spec.engine_kwargs)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model_cls = AutoModelForSequenceClassification if spec.kind == "classifier" else AutoModelForCausalLM
        self.model = model_cls.from_pretrained(path, **kwargs).to(self.device).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        context = spec.max_model_len or getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.fmt = ChatFormatter(self.tokenizer, context)
        eos = self.model.generation_config.eos_token_id if spec.kind == "causal" else None
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_ids = sorted(set(eos) | {self.tokenizer.eos_token_id})
        if spec.kind == "token_logit":
            check_score_token(spec, self.model.config.vocab_size)  # a wrong token fails the pool at start, not every row
        self._pending: list[tuple[Callable, list, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None
        self._streamers: dict[int, "_Deltas"] = {}  # id of a streamed request -> its streamer (`chat_stream`)
        self._owners: list[asyncio.Future] = []  # the running batch's caller per item (read by the generate thread)

    def info(self) -> dict[str, Any]:
        return {"backend": "hf", "device": str(self.device), "max_model_len": self.fmt.max_model_len, "threads": torch.get_num_threads()}

    # -- the async surface: queue, then run in a thread so the actor keeps accepting calls ------
    async def chat(self, requests: list[ChatRequest]) -> list[ChatResult]:
        return await self._submit(self._run_chat, requests)

    async def chat_stream(self, request: ChatRequest):
        """Text deltas while `generate` runs (a streamer on the request's own generate call: it is
        not batched with others), then the result. Leaving early cancels the call (`_Gone`)."""
        if request.sampling.n != 1:
            yield (await self.chat([request]))[0]
            return
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[str] = asyncio.Queue()
        self._streamers[id(request)] = _Deltas(self.tokenizer, lambda text: loop.call_soon_threadsafe(deltas.put_nowait, text))
        job = asyncio.ensure_future(self.chat([request]))
        try:
            while not job.done() or not deltas.empty():
                getter = asyncio.ensure_future(deltas.get())
                await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            yield job.result()[0]
        finally:
            job.cancel()
            self._streamers.pop(id(request), None)

    async def next_token_logprobs(self, requests: list[NextTokenRequest]) -> list[ScoreResult]:
        if self.spec.kind != "causal":
            return await super().next_token_logprobs(requests)
        return await self._submit(self._run_next_token, requests)

    async def classify(self, requests: list[ClassifyRequest]) -> list[ScoreResult]:
        if self.spec.kind == "token_logit":
            return await self._submit(self._run_token_logit, requests)
        if self.spec.kind != "classifier":
            return await super().classify(requests)
        return await self._submit(self._run_classify, requests)

    async def update_weights(self, states: list[dict[str, Any]]) -> list[None]:
        return await self._submit(self._load_weights, states)  # queued: never mid-generate

    async def _submit(self, run: Callable, items: list) -> list:
        if not items:
            return []
        future = asyncio.get_running_loop().create_future()
        self._pending.append((run, items, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        await asyncio.sleep(BATCH_WAIT_S)
        while self._pending:
            pending, self._pending = self._pending, []
            for run in dict.fromkeys(r for r, _, _ in pending):  # one batch per kind, in arrival order
                await self._run_jobs(run, [(items, fut) for r, items, fut in pending if r == run])  # (bound methods: ==, not is)

    async def _run_jobs(self, run: Callable, jobs: list[tuple[list, asyncio.Future]]) -> None:
        """Run the callers' jobs as one batch. If the batch raises, the culprit is unknown: each job is
        run alone (and a job of several requests that fails alone, each of its requests alone), so the
        one failing request fails its caller only and every other caller gets its results. This costs
        nothing while batches succeed; a failure costs one run per job (request) of that batch. A
        `BackendError` is no request's fault: every caller gets it at once.

        A caller cancelled while queued (its client gone) is dropped here, before any work; one
        cancelled mid-batch stops its rows (`_Gone`), and the batch ends early once no row has a
        caller left."""
        jobs = [(items, fut) for items, fut in jobs if not fut.cancelled()]
        if not jobs:
            return
        flat = [item for items, _ in jobs for item in items]
        self._owners = [fut for items, fut in jobs for _ in items]
        try:
            results = await asyncio.to_thread(run, flat)
        except Exception as e:
            if len(flat) == 1 or isinstance(e, BackendError):
                for _, fut in jobs:
                    _settle(fut, e)
            elif len(jobs) > 1:
                log.debug("a batch of %d calls failed (%s: %s); running each call alone", len(jobs), type(e).__name__, e)
                for job in jobs:
                    await self._run_jobs(run, [job])
            else:
                [(items, fut)] = jobs
                outcomes: list = []
                for item in items:  # until one fails: that fails its caller, whatever the rest do
                    outcomes += await self._alone(run, item)
                    if isinstance(outcomes[-1], Exception):
                        break
                _settle(fut, outcomes)
            return
        it = iter(results)
        for items, fut in jobs:
            _settle(fut, list(itertools.islice(it, len(items))))

    async def _alone(self, run: Callable, item: Any) -> list:
        """One request run by itself: its result, or the exception it raised, as a result."""
        try:
            return await asyncio.to_thread(run, [item])
        except Exception as e:
            return [e]

    # -- the batched work (runs in a thread) ------------------------------------------------------
    def _run_chat(self, requests: Sequence[ChatRequest]) -> list[ChatResult | Exception]:
        """Rows batch by what `generate` takes once per call: temperature, top_p and stop strings. A
        seeded sampled request is a group of its own, run from its seed (`_seeded`): its samples then
        depend on nothing else in the queue, at the cost of not sharing a batch."""
        results: list[Any] = [None] * len(requests)
        samples: dict[int, list[Completion | None]] = {}
        rows: list[tuple[int, int, list[int], int]] = []  # (request, sample, prompt ids, max new tokens)
        groups: dict[tuple, list[int]] = defaultdict(list)  # (temperature, top_p, stop, (seed, request) or None) -> rows
        prompt_lens = {}
        for i, req in enumerate(requests):
            try:
                ids = self.fmt.prompt_ids(req.messages, req.prefix)
            except Exception as e:
                results[i] = e
                continue
            prompt_lens[i] = len(ids)
            samples[i] = [None] * req.sampling.n
            s = req.sampling
            seeded = (s.seed, i) if s.seed is not None and s.temperature > 0 else None
            streamed = i if id(req) in self._streamers else None  # a streamer follows one row: its own group
            for k in range(s.n):
                groups[(s.temperature, s.top_p if s.temperature > 0 else 1.0, s.stop, seeded, streamed)].append(len(rows))
                rows.append((i, k, ids, self.fmt.room(len(ids), s.max_tokens)))
        for (temperature, top_p, stop, seeded, streamed), members in groups.items():
            streamer = self._streamers.get(id(requests[streamed])) if streamed is not None else None
            # Similar lengths together: less padding, fewer wasted decode steps.
            members.sort(key=lambda r: (rows[r][3], len(rows[r][2])))
            with _seeded(seeded[0] if seeded else None, self.device):
                for chunk in _chunks(members, self.spec.batch_size):
                    batch = [rows[r] for r in chunk if not self._owners[rows[r][0]].cancelled()]
                    if not batch:
                        continue
                    for (i, k, _, _), completion in zip(batch, self._generate(batch, temperature, top_p, stop, streamer)):
                        samples[i][k] = completion
        for i, completions in samples.items():
            if None not in completions:  # (a cancelled caller's rows are not all run: nobody reads them)
                results[i] = ChatResult(completions=completions, prompt_tokens=prompt_lens[i])
        return results

    @torch.no_grad()
    def _load_weights(self, states: Sequence[dict[str, Any]]) -> list[None]:
        self.model.load_state_dict(states[-1])
        return [None] * len(states)

    @torch.inference_mode()
    def _generate(self, batch: list[tuple[int, int, list[int], int]], temperature: float, top_p: float, stop: tuple[str, ...] = (), streamer=None) -> list[Completion]:
        input_ids, attention = self._pad([ids for _, _, ids, _ in batch])
        max_new = max(m for *_, m in batch)
        config = GenerationConfig(
            max_new_tokens=max_new,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_p=top_p if temperature > 0 else None,
            top_k=0,  # nucleus sampling only, as vLLM and the paper
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.eos_ids,
        )
        criteria: list[StoppingCriteria] = [_Gone([self._owners[i] for i, *_ in batch])]
        stop_text = _StopText(self.tokenizer, stop, input_ids.shape[1], len(batch)) if stop else None
        if stop_text is not None:
            criteria.append(stop_text)
        out = self.model.generate(input_ids=input_ids, attention_mask=attention, generation_config=config, stopping_criteria=criteria, streamer=streamer)
        generated = out[:, input_ids.shape[1] :].tolist()
        completions = []
        for row, (tokens, (_, _, _, limit)) in enumerate(zip(generated, batch)):
            end = next((j for j, t in enumerate(tokens) if t in self.eos_ids), None)
            at = stop_text.stopped_at[row] if stop_text is not None else None  # tokens generated when a stop string appeared
            if at is not None and at <= limit and (end is None or at <= end):
                kept, count, reason = tokens[:at], at, "stop"
            elif end is not None and end < limit:
                kept, count, reason = tokens[:end], end + 1, "stop"
            else:
                kept, count, reason = tokens[:limit], limit, "length"
            completions.append(Completion(_cut(self.tokenizer.decode(kept, skip_special_tokens=True), stop), count, reason))
        return completions

    def _run_next_token(self, requests: Sequence[NextTokenRequest]) -> list[ScoreResult | Exception]:
        def prepare(req: NextTokenRequest):
            text = self.fmt.prompt_text(req.messages, req.prefix)
            ids = self.fmt.checked(self.fmt.encode(text))
            return ids, self.fmt.choice_token_ids(text, ids, req.choices)

        def score(logits: torch.Tensor, prepared) -> list[float]:
            logprobs = torch.log_softmax(logits[-1].float(), dim=-1)
            return [float(logprobs[t]) for t in prepared[1]]

        return self._forward_each(requests, prepare, score, logits_to_keep=1)

    def _run_classify(self, requests: Sequence[ClassifyRequest]) -> list[ScoreResult | Exception]:
        return self._forward_each(requests, lambda req: (self.fmt.conversation_ids(req.messages),), lambda logits, _: [float(logits[0])])

    def _run_token_logit(self, requests: Sequence[ClassifyRequest]) -> list[ScoreResult | Exception]:
        """The raw logit (no softmax) of `spec.score_token_id` at the conversation's last token.

        The conversation ends with the response's turn and no generation prompt, as the released
        Nemotron reward/Select models are read. Rows are left-padded, so the last position of every
        row is its own last token; the attention mask and mask-derived positions make the padding
        invisible, so a row's score does not depend on what it was batched with."""
        token = self.spec.score_token_id  # checked against the vocabulary when the model loaded
        return self._forward_each(
            requests, lambda req: (self.fmt.conversation_ids(req.messages),), lambda logits, _: [float(logits[-1, token])], logits_to_keep=1
        )

    @torch.inference_mode()
    def _forward_each(self, requests, prepare: Callable, score: Callable, **forward_kwargs) -> list[ScoreResult | Exception]:
        """One forward pass per chunk of requests; `score` reads each row's output logits.

        Causal scoring passes `logits_to_keep=1`: only the last position's vocabulary logits are
        needed, and computing them everywhere costs as much as the rest of the forward.
        """
        results: list[Any] = [None] * len(requests)
        ready = []
        for i, req in enumerate(requests):
            try:
                ready.append((i, prepare(req)))
            except Exception as e:
                results[i] = e
        for chunk in _chunks(ready, self.spec.batch_size):
            input_ids, attention = self._pad([prepared[0] for _, prepared in chunk])
            positions = (attention.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions, **forward_kwargs).logits
            for row, (i, prepared) in enumerate(chunk):
                results[i] = ScoreResult(scores=score(logits[row], prepared), prompt_tokens=len(prepared[0]))
        return results

    def _pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in sequences)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in sequences], device=self.device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences], device=self.device)
        return ids, mask


class _Deltas(TextStreamer):
    """transformers' text streamer (whole words, no prompt, no special tokens), handing each piece of
    text to `push` (from the generate thread: `push` must be thread-safe)."""

    def __init__(self, tokenizer, push: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.push = push

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.push(text)


class _Gone(StoppingCriteria):
    """Ends the rows whose caller was cancelled, checked at every decode step: `generate` stops when
    no row is left, so a client that gave up stops costing compute within one token."""

    def __init__(self, owners: list[asyncio.Future]):
        self.owners = owners

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.tensor([owner.cancelled() for owner in self.owners], device=input_ids.device)


class _StopText(StoppingCriteria):
    """Ends each row once its generated text contains a stop string, and notes when (`stopped_at`:
    tokens generated by then). It decodes only the tail a stop string can span (a token is at least
    one byte), so a check costs the same at every step; transformers' own `stop_strings` instead
    precomputes tables over the whole vocabulary per call (seconds for a long stop string)."""

    def __init__(self, tokenizer, stop: tuple[str, ...], prompt_width: int, rows: int):
        self.tokenizer, self.stop, self.start = tokenizer, stop, prompt_width
        self.window = max(len(s.encode("utf-8")) for s in stop) + 1  # +1: a stop string may start mid-token
        self.stopped_at: list[int | None] = [None] * rows

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.start
        tails = input_ids[:, -min(self.window, generated) :].tolist()
        for row, tail in enumerate(tails):
            if self.stopped_at[row] is None and any(s in self.tokenizer.decode(tail, skip_special_tokens=True) for s in self.stop):
                self.stopped_at[row] = generated
        return torch.tensor([at is not None for at in self.stopped_at], device=input_ids.device)


def _cut(text: str, stop: tuple[str, ...]) -> str:
    """The text before its first stop string (OpenAI and vLLM return no stop string)."""
    return text[: min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))]


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    """Sample from `seed` inside, leaving the backend's own random state as it was (no seed: as is)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _settle(fut: asyncio.Future, outcome: list | Exception) -> None:
    """A caller's future: its results, or the first error among them (a caller gone, its future
    cancelled, is skipped: the batch's other callers must still get theirs)."""
    if fut.done():
        return
    error = outcome if isinstance(outcome, Exception) else next((r for r in outcome if isinstance(r, Exception)), None)
    fut.set_exception(error) if error is not None else fut.set_result(outcome)


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]
