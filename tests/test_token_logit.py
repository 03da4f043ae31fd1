"""The token_logit reward scorer: the raw logit of one vocabulary token at the conversation's last token.

The reference is computed here directly, as the released Nemotron-70B-Reward / Select model cards
read their models: `apply_chat_template(prompt + response, add_generation_prompt=False)`, one
unpadded forward pass, `logits[0, -1, token]`, no softmax. fescale must give the same number on the
HF backend (batched, left-padded) and on the vLLM backend (CPU engine in a real Ray pool).
"""

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.backend import BackendSpec, ClassifyRequest
from actors.errors import ConfigError
from actors.hf_backend import HFBackend
from conftest import make_config
from engine.config import load_config
from engine.pools import Pools
from engine.steps import SelectStep

PROMPT = ({"role": "user", "content": "What is the capital of France?"},)
CONVERSATIONS = [
    PROMPT + ({"role": "assistant", "content": "Paris."},),
    ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three primes."}, {"role": "assistant", "content": "2, 3 and 5, and many more beyond them: 7, 11, 13."}),
    ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help you today? " * 6}),
]


def reference(model_dir: str, conversation, token: int = 0) -> float:
    """The model card's reading, computed without fescale."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template(list(conversation), add_generation_prompt=False, tokenize=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        return float(model(torch.tensor([ids])).logits[0, -1, token])


@pytest.fixture(scope="module")
def expected(tiny_model):
    return [reference(tiny_model, conv) for conv in CONVERSATIONS]


@pytest.fixture(scope="module")
def hf(tiny_model):
    return HFBackend(BackendSpec(backend="hf", model=tiny_model, kind="token_logit", batch_size=4))


def test_hf_score_is_the_raw_logit_of_token_0(hf, tiny_model, expected):
    [alone] = asyncio.run(hf.classify([ClassifyRequest(CONVERSATIONS[0])]))
    assert alone.scores[0] == pytest.approx(expected[0], abs=1e-4)
    assert alone.prompt_tokens == len(hf.fmt.conversation_ids(CONVERSATIONS[0]))


def test_hf_batch_of_mixed_lengths_matches_each_unpadded_forward(hf, expected):
    results = asyncio.run(hf.classify([ClassifyRequest(c) for c in CONVERSATIONS]))
    assert len({r.prompt_tokens for r in results}) == 3  # three lengths: the short rows are left-padded
    assert [r.scores[0] for r in results] == pytest.approx(expected, abs=1e-4)


def test_other_token_ids_and_the_select_step(tiny_model):
    backend = HFBackend(BackendSpec(backend="hf", model=tiny_model, kind="token_logit", score_token_id=7))
    [res] = asyncio.run(backend.classify([ClassifyRequest(CONVERSATIONS[1])]))
    assert res.scores[0] == pytest.approx(reference(tiny_model, CONVERSATIONS[1], token=7), abs=1e-4)
    cfg = make_config(tiny_model, mode="best_of_n", select={"scorer": "token_logit", "token_id": 7})
    assert cfg.role_kind("reward") == "token_logit" and cfg.role_kind("generator") == "causal"
    from engine.rows import Message, PromptState

    state = PromptState(id="p", messages=[Message(**m) for m in CONVERSATIONS[1][:2]], mode="best_of_n", config_hash="x")
    [score] = asyncio.run(SelectStep(cfg.select, backend).score(state, [CONVERSATIONS[1][2]["content"]]))
    assert score == pytest.approx(res.scores[0], abs=1e-6)


def test_a_token_outside_the_vocabulary_fails_at_load(tiny_model):
    with pytest.raises(ConfigError, match=r"select.token_id=999999 is outside the vocabulary"):
        HFBackend(BackendSpec(backend="hf", model=tiny_model, kind="token_logit", score_token_id=999999))


def test_openai_backend_refuses_token_logit_at_config_load():
    overrides = ["roles.reward.backend=openai", "roles.reward.model=m", "roles.reward.endpoint.base_url=http://127.0.0.1:9/v1", "select.scorer=token_logit"]
    with pytest.raises(ConfigError, match="select.scorer token_logit needs a local causal LM's raw logits"):
        load_config("best_of_n", overrides)
    from actors.openai_backend import OpenAIBackend

    with pytest.raises(ConfigError, match="backend openai cannot serve kind token_logit"):
        OpenAIBackend(BackendSpec(backend="openai", model="m", kind="token_logit", endpoint={"base_url": "http://127.0.0.1:9/v1"}))


def test_presets_read_the_nemotron_models_by_token_logit():
    for preset in ("paper_70b", "best_of_n_70b"):
        cfg = load_config(preset)
        assert (cfg.select.scorer, cfg.select.token_id, cfg.role_kind("reward")) == ("token_logit", 0, "token_logit")


@pytest.mark.slow
def test_vllm_pool_scores_equal_the_reference(ray_session, tiny_model, expected):
    role = {"model": tiny_model, "backend": "vllm", "num_cpus": 1, "threads": 2,
            "engine_kwargs": {"kv_cache_memory_bytes": 256 * 1024 * 1024, "max_model_len": 512}}  # fmt: skip
    cfg = make_config(tiny_model, mode="best_of_n", roles={"generator": {"model": tiny_model, "backend": "hf"}, "reward": role}, select={"scorer": "token_logit"})
    with Pools(cfg, roles=["reward"]) as pools:
        assert [p.spec.kind for p in pools.layouts.values()] == ["token_logit"]  # the generator is not loaded
        client = pools.client("reward")
        [alone] = asyncio.run(client.classify([ClassifyRequest(CONVERSATIONS[0])]))
        batch = asyncio.run(client.classify([ClassifyRequest(c) for c in CONVERSATIONS]))
    assert alone.scores[0] == pytest.approx(expected[0], abs=1e-3)
    assert [r.scores[0] for r in batch] == pytest.approx(expected, abs=1e-3)
