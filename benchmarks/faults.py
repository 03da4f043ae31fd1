"""Fault injection for the fault-tolerance tests and `benchmarks.chaos`: real crashes, installed from outside.

Production code holds no hooks for this. Faults come in two ways:
- `FaultyBackend`, a backend that wraps a real one (a role's `backend: benchmarks.faults:FaultyBackend`,
  found through `actors.registry`). Its `engine_kwargs.faults` say what to do: a request whose
  messages contain `crash_on` kills the replica process (`os._exit`, a real crash, not a mock); one
  containing `hang_on` never gets an answer; `inner` names the wrapped backend (default hf). The
  other `engine_kwargs` go to the inner backend.
- `python -m benchmarks.faults exit-before-manifest SHARD -- DISTILL ARGS`: runs `fescale distill`
  in this process and kills it between SHARD's files being renamed into place and its manifest line,
  the worst instant for the exactly-once guarantee.

Example role:
    generator: {model: embedded, backend: benchmarks.faults:FaultyBackend, engine_kwargs: {faults: {crash_on: POISON}}}
"""

from __future__ import annotations

import asyncio
import os
import runpy
import sys
from dataclasses import replace
from typing import Any

from actors.backend import Backend, BackendSpec
from actors.registry import make_backend
from engine import distill

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


def exit_before_manifest(shard: str, argv: list[str]) -> None:
    """Run the `fescale` command line `argv` in this process; die when `shard` is about to be listed."""
    append = distill._append

    def dying_append(path, entry: dict) -> None:
        if entry.get("shard") == shard:
            os._exit(1)
        append(path, entry)

    distill._append = dying_append
    sys.argv = ["fescale", *argv]
    runpy.run_module("cli", run_name="__main__")  # the command line, as `python -m cli` runs it


if __name__ == "__main__":
    if len(sys.argv) < 4 or sys.argv[1] != "exit-before-manifest" or sys.argv[3] != "--":
        sys.exit("usage: python -m benchmarks.faults exit-before-manifest SHARD -- DISTILL ARGS")
    exit_before_manifest(sys.argv[2], sys.argv[4:])
