"""How much memory a model needs, from its `config.json`: parameters, weights per GPU, KV cache per token.

Pure arithmetic over the config's shape (hidden size, layers, attention and KV heads, head size,
intermediate size, vocabulary, tied embeddings, dtype) of a dense decoder transformer with a gated
MLP (Llama, Mistral, Qwen2, SmolLM2). The config comes from the model's local folder or, for a
model that is not on this machine (planning a GPU cluster from a laptop), from the facts shipped in
`configs/models/<folder name>.json` (the paper's 70B Llama-3.x models); nothing is downloaded.
Units are decimal: 1 GB = 1e9 bytes.

Example:
    >>> facts = load_facts("/models/Llama-3.3-70B-Instruct")  # not here: the shipped facts
    >>> facts.num_params, facts.kv_bytes_per_token("bfloat16")
    (70553706496, 327680)
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path

from actors.models import EMBEDDED, resolve_model
from engine.config import CONFIGS_DIR
from actors.errors import ConfigError

SHIPPED_FACTS = CONFIGS_DIR / "models"
GB = 1e9
DTYPE_BYTES = {
    "float32": 4, "float": 4,
    "bfloat16": 2, "float16": 2, "half": 2,
    "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "float8_e4m3fn": 1,
}  # fmt: skip
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def dtype_bytes(dtype: str, key: str) -> int:
    """Bytes per value of a dtype name as configs and vLLM spell them (`torch.bfloat16` too)."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise ConfigError(f"`{key}`: dtype {dtype!r} is not one the planner knows; use one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


@dataclass(frozen=True)
class ModelFacts:
    """The shape of a model, as its config.json states it."""

    source: str  # the config.json read
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool
    attention_bias: bool  # q, k, v and o projections have biases (Llama's `attention_bias`)
    mlp_bias: bool
    score_labels: int | None  # a *ForSequenceClassification checkpoint: its score head's outputs; None: an LM head
    dtype: str
    max_position_embeddings: int | None

    @classmethod
    def from_config(cls, config: dict, source: str) -> "ModelFacts":
        def need(name: str) -> int:
            if not isinstance(config.get(name), int):
                raise ConfigError(f"{source}: `{name}` is missing; the planner reads a decoder model's config.json (Llama, Mistral, Qwen2 style)")
            return config[name]

        if any(config.get(k) for k in _MOE_KEYS):
            raise ConfigError(f"{source}: a mixture-of-experts model; the planner only sizes dense models")
        heads, hidden = need("num_attention_heads"), need("hidden_size")
        architecture = (config.get("architectures") or [""])[0]
        labels = config.get("num_labels") or len(config.get("id2label") or {}) or 2
        return cls(
            source=source,
            hidden_size=hidden,
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or hidden // heads,
            intermediate_size=need("intermediate_size"),
            vocab_size=need("vocab_size"),
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
            score_labels=labels if architecture.endswith("ForSequenceClassification") else None,
            dtype=str(config.get("dtype") or config.get("torch_dtype") or "float32"),
            max_position_embeddings=config.get("max_position_embeddings"),
        )

    @property
    def num_params(self) -> int:
        """Embeddings + layers (q, k, v, o; gate, up, down; two norms) + final norm + output head
        (none when tied to the embeddings; a score head for a sequence classifier)."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        i = self.intermediate_size
        attention = h * q + 2 * h * kv + q * h + ((q + 2 * kv + h) if self.attention_bias else 0)
        mlp = 3 * h * i + ((2 * i + h) if self.mlp_bias else 0)
        layer = attention + mlp + 2 * h
        if self.score_labels:
            head = h * self.score_labels
        else:
            head = 0 if self.tied_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_layers * layer + h + head

    def weight_bytes_per_gpu(self, dtype: str, tp: int = 1) -> float:
        """Tensor parallelism splits every matrix (vLLM also splits the embeddings by vocabulary); the
        few norm weights each GPU keeps whole are left out (under 0.01% of a 70B model)."""
        return self.num_params * dtype_bytes(dtype, "dtype") / tp

    def kv_heads_per_gpu(self, tp: int = 1) -> int:
        """KV heads are split across GPUs; with more GPUs than KV heads each GPU keeps a copy of one."""
        return max(1, self.num_kv_heads // tp)

    def kv_bytes_per_token(self, kv_dtype: str, tp: int = 1) -> int:
        """One token's K and V in every layer, on one GPU: 2 x layers x KV heads x head size x bytes."""
        return 2 * self.num_layers * self.kv_heads_per_gpu(tp) * self.head_dim * dtype_bytes(kv_dtype, "kv_cache_dtype")

    def splits_over(self, tp: int) -> bool:
        """vLLM splits the attention heads evenly over `tp` GPUs; KV heads too, or copies them when fewer."""
        kv = self.num_kv_heads
        return self.num_heads % tp == 0 and (kv % tp == 0 if tp <= kv else tp % kv == 0)

    def tp_problem(self, tp: int) -> str | None:
        """Why vLLM cannot split this model over `tp` GPUs, or None."""
        if self.splits_over(tp):
            return None
        sizes = [t for t in range(1, self.num_heads + 1) if self.splits_over(t)]
        return (
            f"tensor parallelism over {tp} GPUs must split the model's {self.num_heads} attention heads and "
            f"{self.num_kv_heads} KV heads evenly; use num_gpus in {sizes}"
        )


def load_facts(model: str, key: str = "model") -> ModelFacts:
    """The facts of `model`: its local folder's config.json ('embedded' and .gguf files too), else the
    facts shipped for its folder name; errors name `key`."""
    if model == EMBEDDED or Path(model).expanduser().exists():
        path = Path(resolve_model(model, key)) / "config.json"
    else:
        path = SHIPPED_FACTS / f"{Path(model.rstrip('/')).name}.json"
        if not path.is_file():
            known = sorted(p.stem for p in SHIPPED_FACTS.glob("*.json"))
            close = difflib.get_close_matches(path.stem, known, n=1)
            raise ConfigError(
                f"`{key}`: {model!r} is not on this machine and configs/models/ has no facts for {path.stem!r} "
                + (f"(did you mean {close[0]}?)" if close else f"(shipped: {', '.join(known)})")
                + f"; copy the model's config.json to {path}, or plan where the model is"
            )
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"`{key}`: cannot read {path}: {e}") from None
    return ModelFacts.from_config(config, str(path))
