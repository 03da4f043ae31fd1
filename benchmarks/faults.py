"""Fault injection for the fault-tolerance tests and `benchmarks.chaos`: real crashes, installed from outside.

Production code holds no hooks for this. `FaultyBackend` is a backend that wraps a real one (a
role's `backend: benchmarks.faults:FaultyBackend`, found through `actors.registry`). Its
`engine_kwargs.faults` say what to do: a request whose messages contain `crash_on` kills the replica
process (`os._exit`, a real crash, not a mock); one containing `hang_on` never gets an answer;
`inner` names the wrapped backend (default hf). The other `engine_kwargs` go to the inner backend.
`kill_when` SIGKILLs a fescale job with its local Ray cluster once a condition holds (the
kill-and-resume tests of training); `kill_distill` does it once `fescale distill` has committed some
shards: the tests and the chaos benchmark then rerun it and count every prompt once.

Example role:
    generator: {model: embedded, backend: benchmarks.faults:FaultyBackend, engine_kwargs: {faults: {crash_on: POISON}}}
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import psutil

from actors.backend import Backend, BackendSpec
from actors.registry import make_backend

IMPORT_PATH = "benchmarks.faults:FaultyBackend"


def faulty_role(role: dict[str, Any], *, crash_on: str | None = None, hang_on: str | None = None) -> dict[str, Any]:
    """A role mapping whose replicas crash or hang on the given text (the inner backend is the role's)."""
    faults = {"inner": role.get("backend", "hf"), "crash_on": crash_on, "hang_on": hang_on}
    kwargs = {**role.get("engine_kwargs", {}), "faults": {k: v for k, v in faults.items() if v}}
    return {**role, "backend": IMPORT_PATH, "engine_kwargs": kwargs}


class FaultyBackend(Backend):
    def __init__(self, spec: BackendSpec):
        kwargs = dict(spec.engine_kwargs)
        faults = kwargs.pop("faults", {})
        self.crash_on, self.hang_on = faults.get("crash_on"), faults.get("hang_on")
        self.inner = make_backend(replace(spec, backend=faults.get("inner", "hf"), engine_kwargs=kwargs))

    async def _faults(self, requests: list) -> None:
        def contains(text: str | None) -> bool:
            return bool(text) and any(text in m["content"] for r in requests for m in r.messages)

        if contains(self.crash_on):
            os._exit(1)
        if contains(self.hang_on):
            await asyncio.Event().wait()  # never answers

    async def chat(self, requests):
        await self._faults(requests)
        return await self.inner.chat(requests)

    async def next_token_logprobs(self, requests):
        await self._faults(requests)
        return await self.inner.next_token_logprobs(requests)

    async def classify(self, requests):
        await self._faults(requests)
        return await self.inner.classify(requests)

    async def update_weights(self, states):
        return await self.inner.update_weights(states)

    def info(self) -> dict[str, Any]:
        return {**self.inner.info(), "faults": {"crash_on": self.crash_on, "hang_on": self.hang_on}}

    async def close(self) -> None:
        await self.inner.close()


def kill_when(command: list[str], ready: Callable[[], bool], *, cwd: Path, env: dict, timeout_s: float = 600) -> None:
    """Run `command` (a fescale job) in its own session and SIGKILL it, with everything it started (its
    local Ray cluster and workers), once `ready()` holds; return when they are all gone. A job that
    ends or runs `timeout_s` before `ready()` holds is an error (and killed too)."""
    job = subprocess.Popen(command, cwd=cwd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    try:
        while True:  # still running when `ready()` holds: a job that finished was not killed
            if job.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(command[1:4])} ended (exit {job.returncode}) or timed out before it could be killed")
            if ready():
                break
            time.sleep(0.1)
    finally:
        if job.poll() is None:
            tree = psutil.Process(job.pid).children(recursive=True)
            os.killpg(job.pid, signal.SIGKILL)  # the session's process group, at once
            for proc in tree:  # and any process that left the group
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.send_signal(signal.SIGKILL)
            psutil.wait_procs(tree, timeout=30)  # no worker commits anything after this returns
        job.wait()


def kill_distill(args: list[str], out: str, after_shards: int, *, cwd: Path, env: dict, timeout_s: float = 600) -> int:
    """Run `fescale distill ARGS` (writing to `out`, a path or URI), SIGKILL it (`kill_when`) once
    `after_shards` shards are committed, and return how many it had seen committed then."""
    from engine.storage import listing, resolve

    manifest = resolve(str(out)).join("manifest")
    seen = 0

    def committed() -> bool:
        nonlocal seen
        seen = sum(name.endswith(".json") for name, _ in listing(manifest))
        return seen >= after_shards

    kill_when([sys.executable, "-m", "cli", "distill", *args], committed, cwd=cwd, env=env, timeout_s=timeout_s)
    return seen
