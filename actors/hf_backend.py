"""Hugging Face transformers backend: CPU and small GPUs; the embedded default runs on it.

transformers has no continuous batching, so the backend batches for it: calls that arrive while
the model is busy (from every pipeline stage and every prompt in flight) queue up and run as one
left-padded `generate` per (temperature, top_p), split into chunks of `batch_size` sequences.
Fan-out (n samples of one prompt) becomes n rows of the batch, like `num_return_sequences`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import defaultdict
from typing import Any, Callable, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GenerationConfig

from actors.backend import Backend, BackendSpec, ChatRequest, ChatResult, ClassifyRequest, Completion, NextTokenRequest, ScoreResult
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
        self._pending: list[tuple[Callable, list, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None

    def info(self) -> dict[str, Any]:
        return {"backend": "hf", "device": str(self.device), "max_model_len": self.fmt.max_model_len, "threads": torch.get_num_threads()}

    # -- the async surface: queue, then run in a thread so the actor keeps accepting calls ------
    async def chat(self, requests: list[ChatRequest]) -> list[ChatResult]:
        return await self._submit(self._run_chat, requests)

    async def next_token_logprobs(self, requests: list[NextTokenRequest]) -> list[ScoreResult]:
        if self.spec.kind != "causal":
            return await super().next_token_logprobs(requests)
        return await self._submit(self._run_next_token, requests)

    async def classify(self, requests: list[ClassifyRequest]) -> list[ScoreResult]:
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
        `BackendError` is no request's fault: every caller gets it at once."""
        flat = [item for items, _ in jobs for item in items]
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
        results: list[Any] = [None] * len(requests)
        samples: dict[int, list[Completion | None]] = {}
        rows: list[tuple[int, int, list[int], int]] = []  # (request, sample, prompt ids, max new tokens)
        groups: dict[tuple[float, float], list[int]] = defaultdict(list)
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
            for k in range(s.n):
                groups[(s.temperature, s.top_p if s.temperature > 0 else 1.0)].append(len(rows))
                rows.append((i, k, ids, self.fmt.room(len(ids), s.max_tokens)))
        for (temperature, top_p), members in groups.items():
            # Similar lengths together: less padding, fewer wasted decode steps.
            members.sort(key=lambda r: (rows[r][3], len(rows[r][2])))
            for chunk in _chunks(members, self.spec.batch_size):
                batch = [rows[r] for r in chunk]
                for (i, k, _, _), completion in zip(batch, self._generate(batch, temperature, top_p)):
                    samples[i][k] = completion
        for i, completions in samples.items():
            results[i] = ChatResult(completions=completions, prompt_tokens=prompt_lens[i])
        return results

    @torch.no_grad()
    def _load_weights(self, states: Sequence[dict[str, Any]]) -> list[None]:
        self.model.load_state_dict(states[-1])
        return [None] * len(states)

    @torch.inference_mode()
    def _generate(self, batch: list[tuple[int, int, list[int], int]], temperature: float, top_p: float) -> list[Completion]:
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
        out = self.model.generate(input_ids=input_ids, attention_mask=attention, generation_config=config)
        generated = out[:, input_ids.shape[1] :].tolist()
        completions = []
        for tokens, (_, _, _, limit) in zip(generated, batch):
            stop = next((j for j, t in enumerate(tokens) if t in self.eos_ids), None)
            if stop is not None and stop < limit:
                kept, count, reason = tokens[:stop], stop + 1, "stop"
            else:
                kept, count, reason = tokens[:limit], limit, "length"
            completions.append(Completion(self.tokenizer.decode(kept, skip_special_tokens=True), count, reason))
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
