"""Shared fixtures: one real local Ray cluster per session, the embedded SmolLM2, tiny real models.

Tiny models are real transformers (Llama architecture) built from a config with random weights
and SmolLM2's tokenizer and chat template: they exercise every code path in seconds. The embedded
SmolLM2 is the real default model, dequantized once into the cache by `fescale prepare`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from s3_server import CLIENT_ENV, s3_bucket, s3_server  # noqa: F401  (fixtures: a loopback S3 server)

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.update(CLIENT_ENV)  # before Ray starts, so its workers reach the S3 test server (s3_server.py)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level=logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def embedded_dir() -> str:
    from actors.models import EMBEDDED, resolve_model

    return resolve_model(EMBEDDED)


def _tiny(embedded_dir: str, out: Path, classifier: bool) -> str:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 64: a size vLLM's CPU attention supports
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=1,
    )
    torch.manual_seed(0)
    model = (LlamaForSequenceClassification if classifier else LlamaForCausalLM)(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_model(embedded_dir, tmp_path_factory) -> str:
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template (context 512)."""
    return _tiny(embedded_dir, tmp_path_factory.mktemp("tiny-causal"), classifier=False)


@pytest.fixture(scope="session")
def tiny_classifier(embedded_dir, tmp_path_factory) -> str:
    """The same tiny Llama with a scalar sequence-classification head (a reward model's shape)."""
    return _tiny(embedded_dir, tmp_path_factory.mktemp("tiny-classifier"), classifier=True)


def make_config(model: str, mode: str = "feedback_edit", **sections):
    """A config on one model (HF, 1 CPU) with tiny token limits; keyword args override sections."""
    from engine.config import build_config

    data = {
        "mode": mode,
        "roles": {"generator": {"model": model, "backend": "hf", "num_cpus": 1, "threads": 1}},
        "generate": {"max_tokens": 8},
        "feedback": {"plan": "3@0.7", "max_tokens": 8, "guided_level": True},
        "edit": {"max_tokens": 8},
        "pipeline": {"batch_size": 2, "max_concurrent_batches": 16, "ready_timeout_s": 300},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return build_config(data)

