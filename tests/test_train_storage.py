"""Training outputs on object storage: `output_dir=s3://...` against a real S3 server (moto's, on
127.0.0.1, started by the test session: tests/s3_server.py), and hostile output locations.

The kill-and-resume test runs `fescale train` as a user does, SIGKILLs it after its first checkpoint
has landed in the bucket, reruns it and checks it went on from that checkpoint, read back from S3.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from actors.errors import BackendError, ConfigError
from benchmarks.faults import kill_when
from conftest import REPO, SHARED
from engine import storage
from train.config import load_train_config
from train.outputs import METRICS, RunOutput
from train.runner import train

FIXTURES = SHARED / "fixtures" / "helpsteer3"


def write_model(folder: Path, marker: str, shards: int = 1) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"marker": marker}))
    for i in range(shards):
        (folder / f"model-{i:05d}.safetensors").write_text(f"weights {i} {marker}")


def read_json(loc) -> dict:
    return json.loads(storage.read_bytes(loc))


def test_a_model_on_s3_replaces_the_old_one_and_its_stale_shards(s3_bucket, tmp_path):
    out = RunOutput.of(f"{s3_bucket}/run")
    write_model(tmp_path / "old", "old", shards=3)
    out.publish_model(tmp_path / "old")
    write_model(tmp_path / "new", "new", shards=1)
    (tmp_path / "new" / "sub").mkdir()
    (tmp_path / "new" / "sub" / "tokenizer.json").write_text("{}")
    final = out.publish_model(tmp_path / "new")
    assert final.uri == f"{s3_bucket}/run/model"
    assert storage.tree(final) == ["config.json", "model-00000.safetensors", "sub/tokenizer.json"]
    assert read_json(final.join("config.json")) == {"marker": "new"}
    assert storage.read_bytes(final.join("model-00000.safetensors")) == b"weights 0 new"


def test_a_crash_mid_upload_leaves_no_config_json_so_no_loader_takes_the_half_model(s3_bucket, tmp_path, monkeypatch):
    out = RunOutput.of(f"{s3_bucket}/run")
    write_model(tmp_path / "old", "old", shards=2)
    out.publish_model(tmp_path / "old")
    write_model(tmp_path / "new", "new", shards=2)
    real, calls = storage.write_bytes, []

    def crash_on_second(loc, data):
        calls.append(loc.uri)
        if len(calls) == 2:
            raise BackendError(f"storage {loc.uri}: the storage endpoint cannot be reached")
        real(loc, data)

    monkeypatch.setattr(storage, "write_bytes", crash_on_second)
    with pytest.raises(BackendError):
        out.publish_model(tmp_path / "new")
    monkeypatch.undo()
    assert "config.json" not in storage.tree(out.loc.join("model"))
    out.publish_model(tmp_path / "new")  # the rerun's export completes it
    assert read_json(out.loc.join("model", "config.json")) == {"marker": "new"}


def test_staged_metrics_continue_the_file_already_in_the_bucket(s3_bucket):
    out = RunOutput.of(f"{s3_bucket}/run")
    out.write_text(METRICS, '{"kind": "train", "step": 1}\n')
    staged = out.staging()
    with open(staged / METRICS, "a") as f:
        f.write('{"kind": "resume", "step": 1}\n')
    (staged / "tensorboard").mkdir()
    (staged / "tensorboard" / "events.out").write_bytes(b"\x00\x01")
    out.push(staged)
    lines = storage.read_bytes(out.loc.join(METRICS)).decode().splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["train", "resume"]
    assert storage.tree(out.loc.join("tensorboard")) == ["events.out"]


@pytest.mark.parametrize("where, message", [
    ("", "empty storage location"),
    ("ftp://host/run", "unsupported storage URI"),
    ("s3://", "malformed storage URI"),
    ("s3:///run", "malformed storage URI"),
    ("runs/\ud800", "lone surrogate"),
    ("runs/\x00x", "NUL"),
])
def test_a_bad_output_location_is_refused_before_any_work(where, message):
    cfg = load_train_config("edit-sft", "edit-sft", [f"data.dir={FIXTURES}", "model=embedded"])
    cfg = cfg.model_copy(update={"output_dir": where})  # --set cannot carry NUL or a surrogate
    with pytest.raises(ConfigError, match=message):
        train(cfg, dry_run=True)


def test_a_missing_bucket_is_one_line_naming_it(s3_server):
    cfg = load_train_config("edit-sft", "edit-sft", [f"data.dir={FIXTURES}", "model=embedded", "output_dir=s3://no-such-bucket-fescale/run"])
    with pytest.raises(BackendError, match="storage s3://no-such-bucket-fescale/run.*: the bucket does not exist"):
        train(cfg, dry_run=True)


def registered(run_dir) -> bool:
    """Ray Train has recorded a checkpoint in the bucket (what a rerun resumes from)."""
    try:
        return read_json(run_dir.join("checkpoint_manager_snapshot.json"))["latest_checkpoint_result"] is not None
    except (TypeError, ValueError, KeyError):
        return False


@pytest.mark.slow
def test_a_training_job_killed_mid_way_resumes_from_its_checkpoint_in_s3(s3_bucket, tiny_model, tmp_path):
    uri = f"{s3_bucket}/runs/edit-sft"
    args = [sys.executable, "-m", "cli", "train", "edit-sft", *[a for s in [
        f"data.dir={FIXTURES}", f"model={tiny_model}", f"output_dir={uri}", "optim.lr=1e-3", "optim.warmup_steps=1",
        "optim.micro_batch_size=2", "optim.global_batch_size=2", "resources.max_failures=0", "checkpoint_every=2",
        "optim.max_steps=6"] for a in ("--set", s)]]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}
    out = storage.resolve(uri)
    kill_when(args, lambda: registered(out.join("ray", "edit-sft")), cwd=tmp_path, env=env)
    assert storage.read_bytes(out.join("model", "config.json")) is None  # no model before the run completes

    second = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    assert f"model: {uri}/model" in second.stdout
    lines = [json.loads(line) for line in storage.read_bytes(out.join(METRICS)).decode().splitlines()]
    (resume,) = [i for i, r in enumerate(lines) if r["kind"] == "resume"]
    resumed_at = lines[resume]["step"]
    assert resumed_at >= 2 and resumed_at % 2 == 0
    assert [r["step"] for r in lines[resume + 1 :] if r["kind"] == "train"] == list(range(resumed_at + 1, 7))
    assert read_json(out.join("model", "config.json"))["architectures"] == ["LlamaForCausalLM"]
    assert "model.safetensors" in storage.tree(out.join("model"))
    assert read_json(out.join("data_report.json"))["stage"] == "edit-sft"
    assert not any(p.name.startswith("s3") for p in tmp_path.iterdir())  # nothing written to a local "s3:" folder
