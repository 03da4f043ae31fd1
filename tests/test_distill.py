"""Distillation output: atomic shards, the manifest as the truth, resume with every prompt exactly once."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import REPO
from engine.distill import ShardSink
from actors.errors import ConfigError
from engine.inputs import InputErrorRow
from engine.rows import Message, PromptState, RowError

ENV = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}


def done(i, error=False):
    s = PromptState(id=f"p{i}", messages=[Message(role="user", content="q")], mode="greedy", config_hash="h", final=None if error else f"a{i}")
    if error:
        s.error = RowError(stage="generate", message="too long")
    return s


def all_ids(out):
    ids = []
    for f in sorted((out / "data").glob("part-*.jsonl")):
        ids += [json.loads(line)["id"] for line in open(f)]
    return ids


def test_shards_commit_by_size_and_on_close(tmp_path):
    sink = ShardSink(tmp_path, "h", [InputErrorRow("in.jsonl", 3, "bad")], shard_size=2, flush_interval_s=1e9)
    sink.write([done(0), done(1), done(2, error=True)])
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["part-00000.jsonl"]
    sink.write([done(3)])
    sink.close()
    assert all_ids(tmp_path) == ["p0", "p1", "p3"]
    assert [json.loads(line)["id"] for line in open(tmp_path / "errors" / "part-00001.jsonl")] == ["p2"]
    assert json.loads(open(tmp_path / "errors" / "input.jsonl").readline())["line"] == 3
    sft = json.loads(open(tmp_path / "sft" / "part-00000.jsonl").readline())
    assert sft["messages"][-1] == {"role": "assistant", "content": "a0"}
    assert ShardSink(tmp_path, "h", [], 2, 1e9).done_ids == {"p0", "p1", "p2", "p3"}


def test_resume_ignores_uncommitted_files_and_a_torn_manifest_line(tmp_path):
    sink = ShardSink(tmp_path, "h", [], shard_size=2, flush_interval_s=1e9)
    sink.write([done(0), done(1)])
    # A crash after the rename but before the manifest append leaves an orphan shard ...
    (tmp_path / "data" / "part-00001.jsonl").write_text(json.dumps({"id": "p2"}) + "\n")
    (tmp_path / "data" / ".part-00002.jsonl.tmp").write_text("partial")
    # ... and a crash mid-append leaves a torn last line.
    with open(tmp_path / "manifest.jsonl", "a") as f:
        f.write('{"kind": "shard", "shard": "part-00001", "ids": ["p2"')
    resumed = ShardSink(tmp_path, "h", [], shard_size=2, flush_interval_s=1e9)
    assert resumed.done_ids == {"p0", "p1"}
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["part-00000.jsonl"]
    resumed.write([done(2), done(3)])
    resumed.close()
    assert all_ids(tmp_path) == ["p0", "p1", "p2", "p3"]
    lines = (tmp_path / "manifest.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # the torn line is gone


def test_resume_with_a_different_config_is_refused(tmp_path):
    ShardSink(tmp_path, "h1", [], 2, 1e9).close()
    with pytest.raises(ConfigError, match="was written with config h1, this run's config is h2"):
        ShardSink(tmp_path, "h2", [], 2, 1e9)


def test_time_based_flush_commits_a_partial_shard(tmp_path):
    sink = ShardSink(tmp_path, "h", [], shard_size=100, flush_interval_s=0.0)
    sink.write([done(0)])
    assert all_ids(tmp_path) == ["p0"]


def tiny_distill(tmp_path, tiny_model, lines: list[str]):
    """`fescale distill` (greedy, the tiny model, shards of 2) over these input lines, as a subprocess:
    (distill(*extra_args, env=extra_env) -> CompletedProcess, output dir)."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "mode": "greedy",
        "roles": {"generator": {"model": tiny_model, "backend": "hf", "num_cpus": 1, "threads": 1}},
        "generate": {"max_tokens": 4},
        "pipeline": {"batch_size": 2},
    }))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"

    def distill(*extra, crash_before_manifest=None):
        args = ["distill", "--config", str(config), "--input", str(prompts), "--output-dir", str(out), "--shard-size", "2", "--quiet", *extra]
        command = ["-m", "benchmarks.faults", "exit-before-manifest", crash_before_manifest, "--"] if crash_before_manifest else ["-m", "cli"]
        return subprocess.run([sys.executable, *command, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)

    return distill, out


def question(i: int) -> str:
    return json.dumps({"id": f"q{i}", "prompt": f"Question {i}?"})


def test_distill_cli_resumes_with_every_prompt_once(tmp_path, tiny_model):
    rows = [question(i) for i in range(5)]
    distill, out = tiny_distill(tmp_path, tiny_model, rows[:2] + ["{broken"] + rows[2:])

    first = distill("--limit", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(all_ids(out)) == ["q0", "q1", "q2"]
    second = distill()
    assert second.returncode == 0, second.stderr[-3000:]
    assert "5 prompts: 3 already written by an earlier run, 2 to go" in second.stderr
    assert sorted(all_ids(out)) == [f"q{i}" for i in range(5)]  # each exactly once
    [bad] = [json.loads(line) for line in open(out / "errors" / "input.jsonl")]
    assert bad["line"] == 3 and "not valid JSON" in bad["error"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed"] == 3 and summary["prompts"] == 2 and summary["input_errors"] == 1
    changed = distill("--set", "seed=7")
    assert changed.returncode == 2 and "resume with the same config" in changed.stderr


@pytest.mark.slow
def test_a_crash_between_shard_rename_and_manifest_line_resumes_exactly_once(tmp_path, tiny_model):
    """`fescale distill` dies (os._exit) right after part-00001's files are renamed into place, before
    its manifest line: the rerun deletes those unlisted files and redoes their prompts, once."""
    distill, out = tiny_distill(tmp_path, tiny_model, [question(i) for i in range(8)])

    crashed = distill(crash_before_manifest="part-00001")
    assert crashed.returncode == 1, crashed.stderr[-3000:]
    assert (out / "data" / "part-00001.jsonl").exists() and "part-00001" not in (out / "manifest.jsonl").read_text()

    resumed = distill()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not in the manifest (an interrupted commit)" in resumed.stderr
    assert sorted(all_ids(out)) == [f"q{i}" for i in range(8)]  # every prompt exactly once
