"""Training knobs for cluster scale: sequence packing, gradient checkpointing, the attention kernel,
the config fingerprint that guards resuming, and the final model folder that appears only complete.

The pure tests use a tiny random Llama built here (no tokenizer, no Ray); one real run trains a
packed, checkpointed edit-sft through Ray Train + DeepSpeed and resumes it.
"""

import json
from pathlib import Path

import pytest
import torch

from actors.errors import ConfigError
from conftest import SHARED
from engine import storage
from train import resume
from train.config import load_train_config
from train.loop import configure_model, deepspeed_config
from train.outputs import replace_folder
from train.resume import check_resume, fingerprint
from train.sft import SFTTask, collate
from train.tokens import IGNORE, pack_sft

FIXTURES = SHARED / "fixtures" / "helpsteer3"


def tiny_llama(attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=128, attn_implementation=attn)
    return LlamaForCausalLM(config)


def examples(lengths=(7, 4, 9, 5, 6)):
    """SFT items shaped like train.tokens.sft_ids: a prompt (ignored) and a response."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(0, 64, (n,), generator=g).tolist()
        prompt = 1 + i % 3
        out.append({"id": f"e{i}", "input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return out


def cfg(*sets, stage="edit-sft"):
    return load_train_config(stage, stage, [f"data.dir={FIXTURES}", "output_dir=/tmp/unused", *sets])


def test_packing_fills_rows_up_to_max_len_and_restarts_positions_per_example():
    items = examples()
    packed = pack_sft(items, 16)
    assert [row["ids"] for row in packed] == [["e0", "e1"], ["e2", "e3"], ["e4"]]
    assert all(len(row["input_ids"]) <= 16 for row in packed)
    assert packed[0]["position_ids"] == [*range(7), *range(4)]
    assert packed[0]["labels"][7] == IGNORE  # nothing may predict an example's first token from the previous one


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_the_unpacked_loss_on_the_same_tokens(attn):
    model = tiny_llama(attn).train()
    items = examples()
    unpacked = model(**collate(items, 0, "cpu"))
    packed_items = pack_sft(items, 16)
    packed = model(**collate(packed_items, 0, "cpu"))  # 3 rows, the last padded
    assert packed.loss.item() == pytest.approx(unpacked.loss.item(), rel=1e-5)
    # no attention across examples: each example's logits are the ones it gets alone
    alone = model(input_ids=torch.tensor([items[1]["input_ids"]])).logits[0]
    assert torch.allclose(packed.logits[0, 7:11], alone, atol=1e-5)


def test_packing_is_a_data_key_for_sft_stages_only():
    items = [{"id": "a", "input_ids": [1, 2, 3], "labels": [IGNORE, 2, 3]}]
    assert collate(items, 0, "cpu").keys() == {"input_ids", "attention_mask", "labels"}
    assert cfg("data.packing=true").data.packing
    with pytest.raises(ConfigError, match=r"`data.packing` is for the SFT stages"):
        cfg("data.packing=true", "rm.tuples_per_step=2", stage="edit-rm")


def test_gradient_checkpointing_reaches_the_model_and_changes_no_loss_or_gradient():
    items = examples()
    grads, losses = [], []
    for flag in (False, True):
        model = tiny_llama().train()
        configure_model(model, cfg(f"gradient_checkpointing={str(flag).lower()}"))
        assert model.is_gradient_checkpointing is flag
        loss = model(**collate(items, 0, "cpu")).loss
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_attn_implementation_is_passed_to_from_pretrained_and_set_on_other_builds(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    c = cfg(f"model={tmp_path}", "attn_implementation=eager")
    task = SFTTask(c, [], [], 0)
    assert task.model_kwargs == {"dtype": torch.float32, "attn_implementation": "eager"}
    assert task.build_model().config._attn_implementation == "eager"
    built_otherwise = tiny_llama("sdpa")  # how the RM and RLOO stages load: configure_model sets it
    configure_model(built_otherwise, c)
    assert built_otherwise.config._attn_implementation == "eager"
    assert "attn_implementation" not in SFTTask(cfg(), [], [], 0).model_kwargs  # unset: transformers' default


def test_a_bad_attn_implementation_is_a_config_error_naming_the_choices():
    with pytest.raises(ConfigError, match=r"`attn_implementation`: Input should be 'eager', 'sdpa', 'flash_attention_2'"):
        cfg("attn_implementation=flash")


@pytest.mark.parametrize("workers, sets, stage", [
    (1, [], 0),  # one worker: nothing to partition, no ZeRO overhead
    (2, [], 2),
    (1, ["deepspeed.zero_stage=3", "deepspeed.offload=true"], 3),  # offload needs ZeRO
    (4, ["deepspeed.zero_stage=3"], 3),
])
def test_zero_runs_only_where_it_partitions_something(workers, sets, stage):
    config = deepspeed_config(cfg("optim.global_batch_size=8", "optim.micro_batch_size=2", *sets), 8, workers)
    assert config["zero_optimization"]["stage"] == stage


def test_resuming_with_a_changed_training_key_is_refused_by_name_unless_forced(monkeypatch, tmp_path, capsys):
    old = cfg("optim.lr=1e-3")
    monkeypatch.setattr(resume, "latest_state", lambda run_dir: {"step": 4, "config": fingerprint(old)})
    check_resume(cfg("optim.lr=1e-3", "log_every=5", "optim.max_steps=100", "gradient_checkpointing=true"), tmp_path)  # neutral keys
    with pytest.raises(ConfigError, match=r"changes training keys since the checkpoint at step 4 .*: data.packing \(False -> True\), "
                                          r"optim.lr \(0.001 -> 0.002\)\. .*resume=force"):
        check_resume(cfg("optim.lr=2e-3", "data.packing=true"), tmp_path)
    check_resume(cfg("optim.lr=2e-3", "resume=force"), tmp_path)
    assert "despite changed keys: optim.lr (0.001 -> 0.002)" in capsys.readouterr().out


def test_no_checkpoint_or_one_without_a_fingerprint_resumes_unchecked(monkeypatch, tmp_path):
    check_resume(cfg(), storage.resolve(str(tmp_path / "no-run-yet")))
    monkeypatch.setattr(resume, "latest_state", lambda run_dir: {"step": 2})
    check_resume(cfg("optim.lr=2e-3"), tmp_path)


def write_model(folder, marker):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"marker": marker}))
    (folder / "model.safetensors").write_text("weights " + marker)


def test_the_final_model_folder_replaces_the_old_one_and_leftover_partials_go(tmp_path):
    write_model(tmp_path / "ckpt", "new")
    write_model(tmp_path / "out" / "model", "old")
    (tmp_path / "out" / ".model.partial-abc").mkdir()  # a crash's leftover: never loaded, removed
    (tmp_path / "out" / ".model.partial-abc" / "config.json").write_text("{}")
    replace_folder(tmp_path / "ckpt", tmp_path / "out" / "model")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model"]
    assert json.loads((tmp_path / "out" / "model" / "config.json").read_text()) == {"marker": "new"}
    assert (tmp_path / "out" / "model").stat().st_mode & 0o777 == 0o755


def test_a_crash_mid_copy_leaves_no_half_model(monkeypatch, tmp_path):
    import shutil

    write_model(tmp_path / "ckpt", "new")

    def copy_then_crash(source, target, **kwargs):
        shutil.copy(source / "config.json", target / "config.json")
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copytree", copy_then_crash)
    for existing in (None, "old"):
        final = tmp_path / f"out-{existing}" / "model"
        final.parent.mkdir()
        if existing:
            write_model(final, existing)
        with pytest.raises(OSError, match="disk full"):
            replace_folder(tmp_path / "ckpt", final)
        if existing:  # the complete earlier model is untouched
            assert json.loads((final / "config.json").read_text()) == {"marker": "old"} and (final / "model.safetensors").is_file()
        else:
            assert not final.exists()


@pytest.mark.slow
def test_a_packed_checkpointed_run_trains_and_resumes_only_with_its_config(ray_session, tiny_model, tmp_path):
    """For real (Ray Train + DeepSpeed): packed SFT with gradient checkpointing and eager attention, its
    fingerprint in the checkpoint; a rerun with another lr is refused before any worker starts, forced it goes on."""
    from train.runner import train

    out = tmp_path / "run"
    sets = [f"data.dir={FIXTURES}", f"model={tiny_model}", f"output_dir={out}", "data.max_seq_len=512", "data.packing=true",
            "gradient_checkpointing=true", "attn_implementation=eager", "optim.global_batch_size=2", "optim.micro_batch_size=1",
            "optim.lr=1e-3", "optim.warmup_steps=1", "resources.max_failures=0", "checkpoint_every=2"]
    model = Path(train(load_train_config("edit-sft", "edit-sft", [*sets, "optim.max_steps=2"])))
    assert json.loads((model / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert resume.latest_state(storage.resolve(str(out / "ray" / "edit-sft")))["config"]["data.packing"] is True
    with pytest.raises(ConfigError, match=r"optim.lr \(0.001 -> 0.002\)"):
        train(load_train_config("edit-sft", "edit-sft", [*sets, "optim.max_steps=3", "optim.lr=2e-3"]))
    train(load_train_config("edit-sft", "edit-sft", [*sets, "optim.max_steps=3", "optim.lr=2e-3", "resume=force"]))
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [(r["kind"], r["step"]) for r in lines if r["kind"] != "validation"] == [("train", 1), ("train", 2), ("resume", 2), ("train", 3)]
