"""The `fescale` command line, run as a user runs it (a subprocess with its own local Ray cluster).

`test_run_default_config_on_the_embedded_model` is the README's main job on two prompts with
short token limits: the default config, the real embedded SmolLM2, the bundled prompts.
"""

import json
import os
import subprocess
import sys

from conftest import REPO

ENV = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}


def fescale(*args, cwd=REPO, timeout=600):
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_help_explains_the_commands():
    out = fescale("--help")
    assert out.returncode == 0
    for word in ["run", "distill", "prepare", "configs", "Feedback-Edit", "ray job submit"]:
        assert word in out.stdout
    run_help = fescale("run", "--help").stdout
    assert "--set KEY=VALUE" in run_help and "--print-config" in run_help


def test_configs_lists_presets_with_a_description():
    out = fescale("configs")
    assert out.returncode == 0
    assert "feedback_edit" in out.stdout and "Best-of-N baseline" in out.stdout


def test_bad_config_and_missing_input_exit_2_with_a_clear_message(tmp_path):
    out = fescale("run", "--set", "feedback.effective=99")
    assert out.returncode == 2 and "fescale: error: invalid config" in out.stderr and "effective feedback E=99" in out.stderr
    out = fescale("run", "--input", str(tmp_path / "nope.jsonl"))
    assert out.returncode == 2 and "does not exist" in out.stderr
    assert "Traceback" not in out.stderr


def test_serve_beyond_loopback_without_keys_is_refused_before_anything_starts():
    env = {k: v for k, v in ENV.items() if k != "FESCALE_API_KEYS"}
    out = subprocess.run([sys.executable, "-m", "cli", "serve", "--host", "0.0.0.0", "--port", "1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "no API key is set: set FESCALE_API_KEYS" in out.stderr and "Traceback" not in out.stderr
    assert "started a local Ray cluster" not in out.stderr
    keyed = subprocess.run([sys.executable, "-m", "cli", "serve", "--print-config", "--set", "serve.api_keys=[s3cret]"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert keyed.returncode == 0 and "api_keys" in keyed.stdout and "s3cret" not in keyed.stdout


def test_print_config_shows_the_resolved_config():
    out = fescale("run", "--print-config", "--set", "generate.num_responses=3")
    assert out.returncode == 0 and "num_responses: 3" in out.stdout and "feedback:\n    model: embedded" in out.stdout


def test_run_default_config_on_the_embedded_model(tmp_path, embedded_dir):
    out_file = tmp_path / "demo.jsonl"
    out = fescale(
        "run", "--limit", "2", "--quiet", "--output", str(out_file),
        "--set", "generate.max_tokens=24", "--set", "feedback.max_tokens=16", "--set", "edit.max_tokens=24",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| id " in out.stdout and "run summary" in out.stdout and "generated tok/s" in out.stdout
    rows = [json.loads(line) for line in open(out_file)]
    assert [r["id"] for r in sorted(rows, key=lambda r: r["id"])] == ["capital", "leap-year"]
    for row in rows:
        assert row["mode"] == "feedback_edit" and row["final"]
        assert len(row["candidates"]) == 2 and all(len(c["feedback"]) == 3 for c in row["candidates"])
    summary = json.loads((tmp_path / "demo.summary.json").read_text())
    assert summary["prompts"] == 2 and summary["feedback"] == 12 and summary["completion_tokens"] > 0
    assert (tmp_path / "demo.sft.jsonl").exists() and (tmp_path / "demo.errors.jsonl").read_text() == ""
