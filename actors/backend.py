"""The one interface every role's model sits behind: chat in, n completions out; scores for reward.

Three implementations, found by name through `actors.registry`: `HFBackend` (transformers, the
embedded default), `VLLMBackend` (vLLM's async engine, production), `OpenAIBackend` (any
OpenAI-compatible endpoint). The method's steps see only `ModelClient`: the same three calls,
answered by a pool of replicas (`actors.client.PoolClient`) or by a backend in-process.

Requests and results are frozen msgspec Structs: a pool's calls carry them to and from its replicas
as one msgpack buffer per call (`actors.wire`), which costs a fraction of pickling them object by
object (benchmarks.engine_overhead), and they still pickle for the other Ray calls.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal, Protocol

import msgspec

from actors.errors import ConfigError


class _Wire(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """What a pool call carries: immutable, encoded as msgpack arrays (no field names on the wire),
    untracked by the garbage collector (they hold no cycles), as vLLM's engine requests."""


class Sampling(_Wire):
    """How to sample a `ChatRequest`'s completions, the same for every backend.

    `stop`: a completion ends before the first of these strings (not included, finish "stop"), as
    OpenAI's and vLLM's `stop`. `seed`: the same seed, request and model give the same samples; None
    leaves the backend's own random state, which lets it batch the request with any other.
    """

    n: int = 1
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None


class ChatRequest(_Wire):
    """Sample `sampling.n` assistant turns after `messages`.

    `prefix` pre-fills the start of the assistant turn; completions continue it and do not repeat it.
    """

    messages: tuple[dict, ...]
    sampling: Sampling
    prefix: str = ""


class Completion(_Wire):
    text: str
    tokens: int
    finish_reason: Literal["stop", "length"]


class ChatResult(_Wire):
    completions: list[Completion]
    prompt_tokens: int  # prefilled once for all n completions

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.completions)


class NextTokenRequest(_Wire):
    """Log-probabilities of each choice's first token right after `messages` (+ the assistant `prefix`).

    The logit judge asks for ("Yes",); the guided feedback level for the five level words.
    """

    messages: tuple[dict, ...]
    choices: tuple[str, ...]
    prefix: str = ""


class ClassifyRequest(_Wire):
    """A reward model's scalar score of a whole conversation (its last turn: the response scored).

    What the score is depends on how the backend loaded the model (`BackendSpec.kind`): the scalar
    head of a sequence-classification model ("classifier"), or the raw logit of one vocabulary token
    at the last position of a causal LM ("token_logit": Nemotron-70B-Reward, Select).
    """

    messages: tuple[dict, ...]


class ScoreResult(_Wire):
    scores: list[float]
    prompt_tokens: int


@dataclass(frozen=True)
class BackendSpec:
    """Everything a replica needs to build its backend (resolved from a `RoleConfig`)."""

    backend: str  # a registered name (hf, vllm, openai) or a "module:Class" import path
    model: str  # a local folder for hf/vllm (already resolved), the model name for openai
    kind: Literal["causal", "classifier", "token_logit"] = "causal"
    score_token_id: int = 0  # kind token_logit: the vocabulary token whose raw logit `classify` returns
    seed: int = 0
    num_gpus: int = 0
    threads: int = 1
    batch_size: int = 32
    max_model_len: int | None = None
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    endpoint: dict[str, Any] | None = None
    executor_backend: str | None = None  # vLLM's distributed_executor_backend, from the placement plan


def check_score_token(spec: BackendSpec, vocab_size: int) -> int:
    """The token a token_logit backend reads; one outside the model's vocabulary is the config's fault."""
    if not 0 <= spec.score_token_id < vocab_size:
        raise ConfigError(f"select.token_id={spec.score_token_id} is outside the vocabulary of {spec.model} ({vocab_size} tokens)")
    return spec.score_token_id


class Backend(abc.ABC):
    """A model behind one of the three engines. All methods keep the order of their requests."""

    @abc.abstractmethod
    async def chat(self, requests: list[ChatRequest]) -> list[ChatResult]: ...

    async def next_token_logprobs(self, requests: list[NextTokenRequest]) -> list[ScoreResult]:
        raise NotImplementedError(f"{type(self).__name__} cannot score next tokens")

    async def classify(self, requests: list[ClassifyRequest]) -> list[ScoreResult]:
        raise NotImplementedError(
            f"{type(self).__name__} has no classifier head; use a sequence-classification model, "
            "or select.scorer token_logit for a causal LM read as a reward model"
        )

    async def chat_stream(self, request: ChatRequest) -> AsyncIterator[str | ChatResult]:
        """One completion (`sampling.n` 1) as it is generated: text deltas, then its `ChatResult`,
        whose text is the authority (stop strings cut). A backend that cannot stream yields only
        the result (one chunk at the end)."""
        yield (await self.chat([request]))[0]

    async def update_weights(self, states: list[dict[str, Any]]) -> list[None]:
        """Load a new state dict in place (the last of `states`): RLOO's trainer -> rollout sync."""
        raise NotImplementedError(f"{type(self).__name__} cannot load new weights in place")

    def info(self) -> dict[str, Any]:
        return {}

    async def close(self) -> None:
        return None


class ModelClient(Protocol):
    """What the method's steps call: a `Backend` in-process, or a pool of replicas of one."""

    async def chat(self, requests: list[ChatRequest]) -> list[ChatResult]: ...

    async def next_token_logprobs(self, requests: list[NextTokenRequest]) -> list[ScoreResult]: ...

    async def classify(self, requests: list[ClassifyRequest]) -> list[ScoreResult]: ...

    def chat_stream(self, request: ChatRequest) -> AsyncIterator[str | ChatResult]: ...
