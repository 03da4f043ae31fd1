"""`ray job submit --working-dir . -- fescale distill ...` against a real running cluster of 2 CPUs,
as `ray start --head` makes on this machine.

A config whose replica takes both CPUs is refused at once, naming what is missing and what to
change (it used to wait forever for the CPUs its stage actors needed). A config that fits is
stopped (`ray job stop`) once a shard is committed, then resubmitted unchanged; the output must end
with every prompt exactly once. The cluster is a `ray start --head --block` of its own, on free
ports, so stopping it leaves the test session's cluster alone.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.slow
PROMPTS = 40  # enough that the job is still running when it is stopped after its first shard
BIN = str(Path(sys.executable).parent)
# Ray 2.60 clusters require a token; the CLI sends ~/.ray/auth_token when told to use token auth.
ENV = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_ADDRESS": "", "RAY_AUTH_MODE": "token"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray(*args, timeout=600):
    return subprocess.run([f"{BIN}/ray", *args], env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture()
def cluster():
    gcs, dashboard, agent, metrics = free_port(), free_port(), free_port(), free_port()
    assert ray("get-auth-token", "--generate").returncode == 0
    # Every port of its own: the session's cluster already holds the default agent port (52365), and a
    # head whose job agent cannot bind it answers every submit with "No available agent".
    head = subprocess.Popen(
        [f"{BIN}/ray", "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
         f"--dashboard-agent-listen-port={agent}", f"--metrics-export-port={metrics}",
         "--include-dashboard=true", "--num-cpus=2", "--disable-usage-stats"],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while ray("job", "list", "--address", address, timeout=60).returncode != 0:
        assert head.poll() is None and time.monotonic() < deadline, "ray start --head did not come up"
        time.sleep(2)
    yield address
    head.terminate()
    head.wait(timeout=60)


def submit(address, *args):
    """`ray job submit`, retried while the head's job agent is still starting (it says so)."""
    deadline = time.monotonic() + 120
    while True:
        out = ray("job", "submit", "--address", address, *args)
        if out.returncode == 0 or "No available agent" not in out.stdout + out.stderr or time.monotonic() > deadline:
            return out
        time.sleep(2)


def data_ids(out):
    return [json.loads(line)["id"] for f in sorted((out / "data").glob("part-*.jsonl")) for line in open(f)]


def test_distill_job_stopped_midway_then_resubmitted_writes_every_prompt_once(cluster, embedded_dir, tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "mode": "greedy",
        "roles": {"generator": {"model": "embedded", "backend": "hf", "num_cpus": 1, "threads": 2}},
        "generate": {"max_tokens": 24},
        "pipeline": {"batch_size": 2, "max_concurrent_batches": 1},
    }))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i:02d}", "prompt": f"Write one sentence about the number {i}."}) + "\n" for i in range(PROMPTS)))
    out = tmp_path / "out"
    entry = ["fescale", "distill", "--config", str(config), "--input", str(prompts), "--output-dir", str(out), "--shard-size", "2", "--quiet"]

    too_big = submit(cluster, "--working-dir", str(REPO), "--", *entry[:2], "--config", "greedy", *entry[4:6], "--output-dir", str(tmp_path / "big"))
    assert too_big.returncode != 0
    assert "no room left for" in too_big.stdout and "roles.generator.num_cpus" in too_big.stdout, too_big.stdout[-3000:]
    assert "Traceback" not in too_big.stdout

    job_id = f"fescale-distill-{os.getpid()}"
    submitted = submit(cluster, "--submission-id", job_id, "--working-dir", str(REPO), "--no-wait", "--", *entry)
    assert submitted.returncode == 0, submitted.stderr
    deadline = time.monotonic() + 400
    while not list((out / "manifest").glob("part-*.json")):
        assert time.monotonic() < deadline, ray("job", "logs", "--address", cluster, job_id).stdout[-3000:]
        time.sleep(0.5)
    assert ray("job", "stop", "--address", cluster, job_id).returncode == 0
    status = ray("job", "status", "--address", cluster, job_id).stdout
    assert "stopped" in status.lower(), status
    deadline = time.monotonic() + 60
    while (out / "_fescale.lock").exists():  # the stopped job releases its output lock on SIGTERM
        assert time.monotonic() < deadline, "the stopped job kept its output lock"
        time.sleep(0.5)
    partial = data_ids(out)
    assert 2 <= len(partial) < PROMPTS and len(set(partial)) == len(partial)

    resubmitted = submit(cluster, "--working-dir", str(REPO), "--", *entry)
    assert resubmitted.returncode == 0, resubmitted.stdout[-3000:]
    assert "already written by an earlier run" in resubmitted.stdout
    final = data_ids(out)
    assert sorted(final) == [f"q{i:02d}" for i in range(PROMPTS)]  # all of them, none twice
    assert set(partial) <= set(final)
