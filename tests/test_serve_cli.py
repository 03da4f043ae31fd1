"""`fescale serve` and the Serve config file it writes, each as a real process with its own local Ray
cluster, answering over HTTP on 127.0.0.1 and stopping cleanly on a signal.

A stop signal is sent at each moment of the server's life, not only once it answers: issue 17 was a
SIGTERM that arrived while `serve.run` still polled the app's status although the app already
answered, and went to Ray's own handler (exit 15, `*** SIGTERM received ***`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import httpx
import pytest
import yaml

from test_serve import free_port, wait_healthy

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
SMALL = ["--set", "roles.generator.num_cpus=1", "--set", "generate.max_tokens=8", "--set", "serve.modes=[greedy]"]
RAY_HANDLER = "SIGTERM received"  # what Ray's own (absl) handler prints: the signal was not fescale's


def fescale_serve(port: int) -> list[str]:
    return [str(BIN / "fescale"), "serve", "--config", "greedy", *SMALL, "--port", str(port)]


def run_server(cmd: list[str], tmp_path: Path, until: Callable[[subprocess.Popen, Path], None], stop: int) -> str:
    """Start the server, wait for `until(proc, log)` to return, send `stop`, and assert it exits 0; its log."""
    log = tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        until(proc, log)
        proc.send_signal(stop)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return log.read_text()


def log_shows(line: str) -> Callable[[subprocess.Popen, Path], None]:
    """Wait until the server's log has `line` (polled every 50 ms: the signal lands in the step that follows it)."""

    def until(proc: subprocess.Popen, log: Path) -> None:
        deadline = time.monotonic() + 300
        while line not in log.read_text():
            _alive(proc, log)
            assert time.monotonic() < deadline, f"no {line!r} in the log within 300s"
            time.sleep(0.05)

    return until


def answered(port: int, replies: list[str]) -> Callable[[subprocess.Popen, Path], None]:
    def until(proc: subprocess.Popen, log: Path) -> None:
        wait_healthy(f"http://127.0.0.1:{port}", 300, check=lambda: _alive(proc, log))
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Say hi."}]}, timeout=120)
        assert r.status_code == 200, r.text
        replies.append(r.json()["choices"][0]["message"]["content"])

    return until


def _alive(proc: subprocess.Popen, log: Path) -> None:
    assert proc.poll() is None, log.read_text()[-3000:]


def test_fescale_serve_answers_and_stops_on_sigterm(embedded_dir, tmp_path):
    port, replies = free_port(), []
    log = run_server(fescale_serve(port), tmp_path, answered(port, replies), signal.SIGTERM)
    assert replies[0]
    assert "stopped on SIGTERM" in log and RAY_HANDLER not in log


@pytest.mark.parametrize(
    "moment, stop",
    [
        ("starting Ray", signal.SIGTERM),  # inside ray.init, where Ray's handler used to be the one installed
        ("started a local Ray cluster", signal.SIGTERM),  # the model replica loading, serve.run waiting
        ("started a local Ray cluster", signal.SIGINT),
        ("healthy", signal.SIGTERM),  # the app answers while serve.run still polls its status: issue 17's moment
    ],
)
def test_fescale_serve_stops_cleanly_at_any_moment_of_start_up(embedded_dir, tmp_path, moment, stop):
    port = free_port()
    until = (lambda proc, log: wait_healthy(f"http://127.0.0.1:{port}", 300, check=lambda: _alive(proc, log))) if moment == "healthy" else log_shows(moment)
    log = run_server(fescale_serve(port), tmp_path, until, stop)
    assert f"stopped on {signal.Signals(stop).name}" in log and RAY_HANDLER not in log, log[-3000:]


def test_written_serve_config_runs_with_serve_run(embedded_dir, tmp_path):
    port, replies = free_port(), []
    config = tmp_path / "serve.yaml"
    wrote = subprocess.run([*fescale_serve(port), "--write-serve-config", str(config)], capture_output=True, text=True)
    assert wrote.returncode == 0, wrote.stderr
    app = yaml.safe_load(config.read_text())["applications"][0]
    assert app["import_path"] == "engine.serve_app:build_app" and app["args"]["config"]["mode"] == "greedy"
    run_server([str(BIN / "serve"), "run", "--address", "local", str(config)], tmp_path, answered(port, replies), signal.SIGINT)
    assert replies[0]
