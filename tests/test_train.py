"""Every training stage for real: Ray Train (TorchTrainer) + DeepSpeed on CPU (gloo, one worker: no ZeRO), a tiny Llama.

Each stage trains on the HelpSteer3-shaped fixtures; the SFT and RM stages repeat one batch (one step
per epoch) and must lower their loss. The models they write are loaded by the engine and run. RLOO
samples its rollouts from a real engine pool and syncs the trained weights into it after each step.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.faults import kill_when
from conftest import REPO, SHARED, make_config
from engine.inputs import Prompt
from engine.runner import execute
from engine.sinks import JsonlSink
from engine.summary import Summary
from train.config import load_train_config
from train.runner import train

FIXTURES = SHARED / "fixtures" / "helpsteer3"
FAST = ["optim.lr=1e-3", "optim.warmup_steps=1", "optim.micro_batch_size=2", "resources.max_failures=0", f"data.dir={FIXTURES}"]


def records(out, kind="train"):
    return [r for r in map(json.loads, open(out / "metrics.jsonl")) if r["kind"] == kind]


def run_stage(stage, model, out, *sets):
    cfg = load_train_config(stage, stage, [*FAST, f"model={model}", f"output_dir={out}", *sets])
    return Path(train(cfg))


@pytest.fixture(scope="module")
def edit_sft(ray_session, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("edit-sft")
    # 14 permutation examples = one step per epoch: the same batch six times
    return run_stage("edit-sft", tiny_model, out, "optim.global_batch_size=14", "optim.epochs=6", "checkpoint_every=3"), out


def test_edit_sft_learns_its_batch_and_keeps_the_best_checkpoint(edit_sft):
    model, out = edit_sft
    losses = [r["loss"] for r in records(out)]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5
    assert [r["step"] for r in records(out, "validation")] == [3, 6]
    report = json.loads((out / "data_report.json").read_text())
    assert report["train"] == 14 and report["dropped"] == {'"perfectly helpful" feedback': 1}
    assert (model / "config.json").is_file() and (model / "tokenizer_config.json").is_file()
    assert records(out)[0]["tokens_per_s"] > 0 and [r["lr"] for r in records(out)][:2] == [0.0, pytest.approx(1e-3)]  # 1 warmup step


@pytest.mark.parametrize("stage", ["feedback-sft", "distill-sft"])
def test_the_other_sft_stages_learn_their_batch(ray_session, tiny_model, tmp_path, stage):
    sets = ["optim.epochs=4", "checkpoint_every=4"]
    if stage == "distill-sft":
        sft = tmp_path / "distill" / "sft"
        sft.mkdir(parents=True)
        rows = [{"id": f"q{i}", "messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i} is short."}]} for i in range(10)]
        (sft / "part-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        sets += [f"data.distill={tmp_path / 'distill'}", "optim.global_batch_size=8"]  # 10 -> 9 train + 1 validation: one step
    else:
        sets += ["data.limit=1", "optim.global_batch_size=6"]  # one row: 2 responses x 3 feedbacks
    run_stage(stage, tiny_model, tmp_path / "out", *sets)
    losses = [r["loss"] for r in records(tmp_path / "out")]
    assert len(losses) == 4 and losses[-1] < losses[0]


@pytest.fixture(scope="module")
def edit_rm(ray_session, edit_sft, tmp_path_factory):
    out = tmp_path_factory.mktemp("edit-rm")
    return run_stage("edit-rm", edit_sft[0], out, "rm.tuples_per_step=2", "optim.micro_batch_size=1", "optim.epochs=5", "checkpoint_every=5"), out


def test_edit_rm_learns_its_pairs_and_reports_accuracy(edit_rm):
    model, out = edit_rm
    train_records = records(out)
    assert len(train_records) == 5 and train_records[-1]["loss"] < train_records[0]["loss"]
    assert 0.0 <= records(out, "validation")[-1]["val_accuracy"] <= 1.0
    assert json.loads((model / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]


def test_trained_editor_and_reward_model_run_in_the_engine(ray_session, tiny_model, edit_sft, edit_rm, tmp_path):
    cfg = make_config(
        tiny_model,
        roles={"generator": {"model": tiny_model, "backend": "hf", "num_cpus": 1, "threads": 1},
               "editor": {"model": str(edit_sft[0]), "backend": "hf", "num_cpus": 1, "threads": 1},
               "reward": {"model": str(edit_rm[0]), "backend": "hf", "num_cpus": 1, "threads": 1}},
        select={"scorer": "sequence_classification", "context": "edit"},  # the Edit RM ranks edits by their edit conversations
    )
    summary = Summary(cfg.mode, cfg.config_hash())
    execute(cfg, [Prompt("p0", [{"role": "user", "content": "Name a colour."}], 1)], JsonlSink(tmp_path / "o.jsonl", []), summary, progress=False)
    (row,) = [json.loads(line) for line in open(tmp_path / "o.jsonl")]
    assert row["final"] is not None and row["candidates"][0]["edits"]


def test_edit_rloo_rolls_out_from_the_engine_and_syncs_weights(ray_session, edit_sft, edit_rm, tmp_path):
    out = tmp_path / "rloo"
    model = run_stage(
        "edit-rloo", edit_sft[0], out, f"rloo.reward_model={edit_rm[0]}", "rloo.rollout_batch_size=2", "rloo.rollouts_per_prompt=2",
        "rloo.max_tokens=8", "optim.micro_batch_size=1", "optim.epochs=2", "checkpoint_every=2", "rloo.rollout.threads=1",
    )
    steps = records(out)
    assert [r["step"] for r in steps] == [1, 2]
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-3)  # the rollouts' policy is the reference at step 1
    assert "val_reward" in records(out, "validation")[-1] and (model / "config.json").is_file()


def test_rollout_replicas_load_new_weights_in_place(ray_session, tiny_model):
    """What RLOO's sync does: after update_weights the replica generates exactly as the new weights do."""
    import asyncio

    import ray
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.backend import ChatRequest, Sampling
    from engine.pools import Pools

    cfg = make_config(tiny_model, mode="greedy")
    request = ChatRequest(({"role": "user", "content": "Hello there"},), Sampling(max_tokens=6))
    reference = AutoModelForCausalLM.from_pretrained(tiny_model)
    torch.manual_seed(1)
    state = {k: v + 0.05 * torch.randn_like(v) for k, v in reference.state_dict().items()}
    reference.load_state_dict(state)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    ids = tokenizer.apply_chat_template(list(request.messages), add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    expected = tokenizer.decode(reference.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1] :], skip_special_tokens=True)
    with Pools(cfg) as pools:
        client = pools.client("generator")
        before = asyncio.run(client.chat([request]))[0].completions[0].text
        (replicas,) = pools.replicas.values()
        ray.get([r.call.remote("update_weights", ray.put([state])) for r in replicas])
        after = asyncio.run(client.chat([request]))[0].completions[0].text
    assert after == expected and after != before


def checkpoint_registered(run_dir) -> bool:
    """Ray Train has recorded a checkpoint (what a rerun resumes from; a folder alone may still be uploading)."""
    try:
        return json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"] is not None
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return False


@pytest.mark.slow
def test_a_killed_training_job_resumes_from_its_last_checkpoint(tiny_model, tmp_path):
    """`fescale train` as a user runs it: SIGKILLed after its first checkpoint, rerun, it goes on from there."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "cli", "train", "edit-sft", *[a for s in FAST for a in ("--set", s)],
            "--set", f"model={tiny_model}", "--set", f"output_dir={out}", "--set", "optim.global_batch_size=2",
            "--set", "checkpoint_every=2", "--set", "optim.max_steps=6"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}
    kill_when(args, lambda: checkpoint_registered(out / "ray" / "edit-sft"), cwd=REPO, env=env)
    first_steps = [r["step"] for r in records(out)]
    second = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    (resume,) = [i for i, r in enumerate(lines) if r["kind"] == "resume"]
    resumed_at = lines[resume]["step"]
    assert 2 <= resumed_at <= max(first_steps) and resumed_at % 2 == 0
    rerun_steps = [r["step"] for r in lines[resume + 1 :] if r["kind"] == "train"]
    assert rerun_steps == list(range(resumed_at + 1, 7))  # no checkpointed step redone, none skipped


def test_feedback_application_check_asks_a_model_through_the_engine(ray_session, tiny_model):
    """The paper's Yes/No check runs on an engine pool; a random tiny model answers neither, so nothing passes."""
    from engine.config import RoleConfig
    from train import prepare

    check = prepare.applied_feedback(RoleConfig(model=tiny_model, num_cpus=1, threads=1))
    assert check([("Added the century rule.", "The response is partially helpful. It lacks the century rule.")] * 3) == [False] * 3
    assert check([]) == []
