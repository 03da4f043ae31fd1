"""Fault injection for the fault-tolerance tests and `benchmarks.chaos`: real crashes, installed from outside.

Production code holds no hooks for this. `FaultyBackend` is a backend that wraps a real one (a
role's `backend: benchmarks.faults:FaultyBackend`, found through `actors.registry`). Its
`engine_kwargs.faults` say what to do: a request whose messages contain `crash_on` kills the replica
process (`os._exit`, a real crash, not a mock); one containing `hang_on` never gets an answer;
`inner` names the wrapped backend (default hf). The other `engine_kwargs` go to the inner backend.
`kill_distill` runs `fescale distill` and SIGKILLs it (with its local Ray cluster) once it has
committed some shards: the tests and the chaos benchmark then rerun it and count every prompt once.

Example role:
    generator: {model: embedded, backend: benchmarks.faults:FaultyBackend, engine_kwargs: {faults: {crash_on: POISON}}}
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

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


def kill_distill(args: list[str], out: str, after_shards: int, *, cwd: Path, env: dict, timeout_s: float = 600) -> int:
    """Run `fescale distill ARGS` (writing to `out`, a path or URI), SIGKILL its process group once
    `after_shards` shards are committed, and return how many were committed at the kill."""
    from engine.storage import listing, resolve

    manifest = resolve(str(out)).join("manifest")
    proc = subprocess.Popen([sys.executable, "-m", "cli", "distill", *args], cwd=cwd, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            committed = sum(name.endswith(".json") for name, _ in listing(manifest))
            if committed >= after_shards:
                return committed
            time.sleep(0.1)
        raise RuntimeError(f"distill ended (exit {proc.returncode}) or timed out before {after_shards} shards were committed")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
