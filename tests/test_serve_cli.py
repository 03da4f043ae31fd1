"""`fescale serve` and the Serve config file it writes, each as a real process with its own local Ray
cluster, answering over HTTP on 127.0.0.1 and stopping cleanly on a signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from test_serve import free_port, wait_healthy

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
SMALL = ["--set", "roles.generator.num_cpus=1", "--set", "generate.max_tokens=8", "--set", "serve.modes=[greedy]"]


def serve_and_ask(cmd: list[str], port: int, tmp_path: Path, stop: int) -> str:
    """Start the server, ask one question, stop it with `stop`; the answer."""
    log = tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", 300, check=lambda: _alive(proc, log))
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Say hi."}]}, timeout=120)
        assert r.status_code == 200, r.text
        proc.send_signal(stop)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return r.json()["choices"][0]["message"]["content"]


def _alive(proc: subprocess.Popen, log: Path) -> None:
    assert proc.poll() is None, log.read_text()[-3000:]


def test_fescale_serve_answers_and_stops_on_sigterm(embedded_dir, tmp_path):
    port = free_port()
    cmd = [str(BIN / "fescale"), "serve", "--config", "greedy", *SMALL, "--port", str(port)]
    assert serve_and_ask(cmd, port, tmp_path, signal.SIGTERM)


def test_written_serve_config_runs_with_serve_run(embedded_dir, tmp_path):
    port = free_port()
    config = tmp_path / "serve.yaml"
    wrote = subprocess.run([str(BIN / "fescale"), "serve", "--config", "greedy", *SMALL, "--port", str(port), "--write-serve-config", str(config)], capture_output=True, text=True)
    assert wrote.returncode == 0, wrote.stderr
    app = yaml.safe_load(config.read_text())["applications"][0]
    assert app["import_path"] == "engine.serve_app:build_app" and app["args"]["config"]["mode"] == "greedy"
    assert serve_and_ask([str(BIN / "serve"), "run", "--address", "local", str(config)], port, tmp_path, signal.SIGINT)
