"""Distillation output: shards written where they are made, manifest entries as the truth, resume with
every prompt exactly once, and nothing deleted that fescale did not write."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from actors.errors import ConfigError
from benchmarks.faults import kill_distill
from conftest import REPO
from engine.config import load_config
from engine.distill import committed, open_job, remove_orphans
from engine.rows import Message, PromptState, RowError
from engine.shards import OUTPUT_SCHEMA, WriteShards
from engine.storage import resolve

ENV = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}


def done(i, error=False):
    s = PromptState(id=f"p{i}", messages=[Message(role="user", content="q")], mode="greedy", config_hash="h", final=None if error else f"a{i}")
    if error:
        s.error = RowError(stage="generate", message="too long")
    return s


def write_shard(out, states, fmt="jsonl"):
    batch = {"id": np.array([s.id for s in states]), "state": np.array([s.to_json() for s in states])}
    return WriteShards(resolve(str(out)), fmt, "h")(batch)


def data_ids(out, fmt="jsonl"):
    if fmt == "parquet":
        return sorted(pq.read_table(out / "data").column("id").to_pylist())
    return sorted(json.loads(line)["id"] for f in (out / "data").glob("part-*.jsonl") for line in open(f))


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_a_shard_is_its_files_then_its_manifest_entry(tmp_path, fmt):
    back = write_shard(tmp_path, [done(0), done(1), done(2, error=True)], fmt)
    write_shard(tmp_path, [done(3)], fmt)
    assert list(back["id"]) == ["p0", "p1", "p2"] and json.loads(back["stats"][2])["failed"]
    assert data_ids(tmp_path, fmt) == ["p0", "p1", "p3"]  # the Parquet shards read as one table
    [errors] = [f for f in (tmp_path / "errors").iterdir() if f.read_text()]
    assert json.loads(errors.read_text()) == {"id": "p2", "stage": "generate", "error": "too long"}
    ids, shards = committed(resolve(str(tmp_path)), fmt)
    assert ids == {"p0", "p1", "p2", "p3"} and len(shards) == 2
    if fmt == "parquet":
        sft = pq.read_table(tmp_path / "sft").to_pylist()
        assert {r["id"]: r["messages"][-1]["content"] for r in sft} == {"p0": "a0", "p1": "a1", "p3": "a3"}


def test_resume_deletes_only_its_own_unlisted_shards_and_redoes_a_listed_shard_that_is_gone(tmp_path):
    out = resolve(str(tmp_path))
    write_shard(tmp_path, [done(0), done(1)])
    lost = write_shard(tmp_path, [done(2)])
    # A kill between a shard's files and its manifest entry leaves files no entry lists ...
    (tmp_path / "data" / "part-0123456789abcdef.jsonl").write_text(json.dumps({"id": "p9"}) + "\n")
    # ... a user's own files sit beside the shards ...
    for foreign in ("data/mine.txt", "data/part-00001.jsonl", "errors/notes.md", "README.txt"):
        (tmp_path / foreign).write_text("not fescale's")
    # ... and a listed shard whose data file went missing.
    [entry] = [e for e in map(json.loads, (f.read_text() for f in (tmp_path / "manifest").iterdir())) if e["ids"] == list(lost["id"])]
    lost_data = tmp_path / "data" / f"{entry['shard']}.jsonl"
    lost_data.unlink()
    ids, shards = committed(out, "jsonl")
    remove_orphans(out, shards)
    assert ids == {"p0", "p1"}  # p2 is redone
    assert not (tmp_path / "data" / "part-0123456789abcdef.jsonl").exists()
    for foreign in ("data/mine.txt", "data/part-00001.jsonl", "errors/notes.md", "README.txt"):
        assert (tmp_path / foreign).read_text() == "not fescale's"


def test_resume_with_another_config_format_or_layout_is_refused(tmp_path):
    out = resolve(str(tmp_path))
    cfg = load_config("greedy")
    open_job(out, cfg, "jsonl")
    open_job(out, cfg, "jsonl")  # the same job again: fine
    with pytest.raises(ConfigError, match="resume with the same config"):
        open_job(out, load_config("greedy", ["seed=7"]), "jsonl")
    with pytest.raises(ConfigError, match="same --format"):
        open_job(out, cfg, "parquet")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "manifest.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="older fescale"):
        open_job(resolve(str(legacy)), cfg, "jsonl")


def tiny_job(tmp_path, tiny_model, lines: list[bytes]):
    """`fescale distill` (greedy, the tiny model, shards of 2) over these input lines, as a subprocess:
    (args, run(*extra) -> CompletedProcess, output dir)."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "mode": "greedy",
        "roles": {"generator": {"model": tiny_model, "backend": "hf", "num_cpus": 1, "threads": 1}},
        "generate": {"max_tokens": 4},
        "pipeline": {"batch_size": 2},
    }))  # fmt: skip
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    args = ["--config", str(config), "--input", str(prompts), "--output-dir", str(out), "--shard-size", "2", "--quiet"]

    def run(*extra):
        return subprocess.run([sys.executable, "-m", "cli", "distill", *args, *extra], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)

    return args, run, out


def question(i: int) -> bytes:
    return json.dumps({"id": f"q{i}", "prompt": f"Question {i}?"}).encode()


def test_distill_cli_resumes_with_every_prompt_once_and_records_bad_rows(tmp_path, tiny_model):
    rows = [question(i) for i in range(5)]
    hostile = [b"{broken", b'{"id": "s", "prompt": "hi \\ud800 there"}', b'{"id": "u", "prompt": "caf\xe9"}', question(1)]
    _, distill, out = tiny_job(tmp_path, tiny_model, rows[:2] + hostile + rows[2:])
    (out / "data").mkdir(parents=True)
    (out / "data" / "mine.txt").write_text("a user's file")

    first = distill("--limit", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    assert data_ids(out) == ["q0", "q1", "q2"]
    second = distill()
    assert second.returncode == 0, second.stderr[-3000:]
    assert "5 prompts: 3 already written by an earlier run, 2 to go" in second.stderr
    assert data_ids(out) == [f"q{i}" for i in range(5)]  # each exactly once
    errors = sorted((json.loads(line) for f in (out / "errors").glob("*.jsonl") for line in open(f)), key=lambda e: e["id"])
    assert [(e["id"].rsplit(":", 1)[-1], e["stage"]) for e in errors] == [("3", "input"), ("4", "input"), ("5", "input"), ("6", "input")]
    assert "not valid JSON" in errors[0]["error"] and "duplicate id 'q1'" in errors[3]["error"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed"] == 3 and summary["prompts"] == 2
    assert (out / "data" / "mine.txt").read_text() == "a user's file"
    changed = distill("--set", "seed=7")
    assert changed.returncode == 2 and "resume with the same config" in changed.stderr and "Traceback" not in changed.stderr


def test_distill_reads_a_helpsteer3_folder_as_published(tmp_path, tiny_model):
    """A HelpSteer3 subset folder (`train.jsonl.gz`, `validation.jsonl.gz`, rows with `context` and no
    id) is read as it is: every .jsonl.gz under the input, each prompt with its content-hash id. A
    .gz beside them that is not gzip, or is cut short, is one input error of its file; the job goes on."""
    import gzip
    import shutil

    from conftest import SHARED
    from engine.inputs import read_prompts

    source = tmp_path / "helpsteer3" / "feedback"
    shutil.copytree(SHARED / "fixtures" / "helpsteer3" / "feedback", source)
    expected = sorted({p.id for f in sorted(source.glob("*.jsonl.gz")) for p in read_prompts(f)[0]})
    (source / "not-gzip.jsonl.gz").write_bytes(b'{"prompt": "plain text under a .gz name"}\n')
    packed = gzip.compress(b'{"prompt": "hi"}\n' * 3)
    (source / "cut.jsonl.gz").write_bytes(packed[:-8])
    args, _, out = tiny_job(tmp_path, tiny_model, [])
    args[args.index("--input") + 1] = str(tmp_path / "helpsteer3")
    result = subprocess.run([sys.executable, "-m", "cli", "distill", *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(expected) >= 4 and data_ids(out) == expected
    errors = sorted(json.loads(line)["id"].rsplit("/", 1)[-1] for f in (out / "errors").glob("*.jsonl") for line in open(f))
    assert errors == ["cut.jsonl.gz:0", "not-gzip.jsonl.gz:0"]


@pytest.mark.slow
def test_a_distill_killed_mid_run_resumes_with_every_prompt_exactly_once(tmp_path, tiny_model):
    """SIGKILL of the driver and its local Ray cluster once 2 shards are committed (shards in flight
    may have written files without their manifest entry): the rerun takes over the dead job's lock,
    deletes what no entry lists and redoes those prompts, once."""
    args, distill, out = tiny_job(tmp_path, tiny_model, [question(i) for i in range(12)])
    assert kill_distill(args, out, after_shards=2, cwd=REPO, env=ENV) >= 2
    resumed = distill()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert data_ids(out) == sorted(f"q{i}" for i in range(12))
    assert not (out / "_fescale.lock").exists()


@pytest.mark.slow
def test_distill_to_s3_in_parquet_survives_a_kill_and_leaves_foreign_objects(tmp_path, tiny_model, s3_bucket):
    """Input and output on a real S3 protocol server (moto, 127.0.0.1): the job is SIGKILLed mid-run
    and rerun; every prompt is in the Parquet shards exactly once, they read as one table with
    pyarrow, and an object of the user's under the output prefix is still there."""
    import boto3

    from engine.storage import listing, resolve, write_bytes

    source, out = f"{s3_bucket}/in/prompts.jsonl", f"{s3_bucket}/run"
    write_bytes(resolve(source), b"\n".join(question(i) for i in range(12)) + b"\n")
    write_bytes(resolve(f"{out}/data/mine.txt"), b"a user's object")
    args, _, _ = tiny_job(tmp_path, tiny_model, [])
    args = [*args[:2], "--input", source, "--output-dir", out, "--format", "parquet", *args[6:]]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}
    assert kill_distill(args, out, after_shards=2, cwd=REPO, env=env) >= 2
    resumed = subprocess.run([sys.executable, "-m", "cli", "distill", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    data = resolve(out).join("data")
    shards = [f"{data.path}/{name}" for name, _ in listing(data) if name.endswith(".parquet")]
    table = pq.ParquetDataset(shards, filesystem=data.fs, schema=OUTPUT_SCHEMA).read()
    assert sorted(table.column("id").to_pylist()) == sorted(f"q{i}" for i in range(12))
    bucket, _, prefix = out.removeprefix("s3://").partition("/")
    body = boto3.client("s3").get_object(Bucket=bucket, Key=f"{prefix}/data/mine.txt")["Body"].read()
    assert body == b"a user's object"


def test_a_job_where_every_prompt_fails_stops_with_one_line(tmp_path, tiny_model):
    """A systemic fault (here: a context too short for any prompt) stops the job after the first 32
    prompts all failed, with one line and no traceback, instead of failing 40 000 prompts one by one."""
    _, distill, out = tiny_job(tmp_path, tiny_model, [question(i) for i in range(48)])
    failed = distill("--set", "roles.generator.max_model_len=4")
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert re.search(r"fescale: error: the first (3[2-9]|4\d) prompts all failed \(\d+ with: prompt is \d+ tokens, the model's context is 4", failed.stderr)
    assert "Traceback" not in failed.stderr


@pytest.mark.parametrize("flags, message", [
    (["--input", "ftp://host/prompts.jsonl"], "unsupported storage URI 'ftp://host/prompts.jsonl'"),
    (["--output-dir", "s3:/bucket"], "malformed storage URI 's3:/bucket'"),
    (["--input", "/no/such/prompts.jsonl"], "input /no/such/prompts.jsonl does not exist"),
    (["--shard-size", "0"], "--shard-size: must be at least 1"),
    (["--limit", "-1"], "--limit: must be at least 1"),
    (["--format", "csv"], "invalid choice: 'csv'"),
])
def test_bad_arguments_are_refused_before_anything_is_written(tmp_path, flags, message):
    out = tmp_path / "out"
    base = {"--input": str(tmp_path / "prompts.jsonl"), "--output-dir": str(out)}
    (tmp_path / "prompts.jsonl").write_bytes(question(0) + b"\n")
    for flag, value in zip(flags[::2], flags[1::2]):
        base[flag] = value
    args = [a for kv in base.items() for a in kv]
    done = subprocess.run([sys.executable, "-m", "cli", "distill", "--config", "greedy", *args], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert not out.exists() and not any(p.name.startswith("s3:") or p.name.startswith("ftp:") for p in tmp_path.iterdir())
