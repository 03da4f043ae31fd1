"""Distillation output: shards plus a manifest, resumable with every prompt exactly once.

Layout of `--output-dir D`:
    D/manifest.jsonl        header line, then one line per committed shard: {shard, ids, failed}
    D/data/part-NNNNN.jsonl output rows            D/sft/part-NNNNN.jsonl  SFT rows ({id, messages})
    D/errors/part-NNNNN.jsonl prompts a stage failed   D/errors/input.jsonl  malformed input rows
    D/summary.json          the last run's summary

A shard commits in this order: each file is written under a temporary name, fsynced and renamed,
then the manifest line is appended and fsynced. The manifest is the truth: on resume, ids listed
in it are skipped, shard files it does not list (a crash between rename and append) are deleted,
and a torn last manifest line is ignored. So a crash at any instant loses at most the rows not yet
committed, which the rerun redoes, and no row is ever written twice.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import IO, Callable

from actors.errors import ConfigError
from engine.inputs import InputErrorRow
from engine.rows import PromptState
from engine.sinks import write_lines

log = logging.getLogger("fescale")

SUBDIRS = ("data", "sft", "errors")


class ShardSink:
    def __init__(self, out_dir: Path, config_hash: str, input_errors: list[InputErrorRow], shard_size: int, flush_interval_s: float):
        self.dir = out_dir
        self.shard_size = shard_size
        self.flush_interval_s = flush_interval_s
        self.manifest = out_dir / "manifest.jsonl"
        self.done_ids, shards = read_manifest(self.manifest, config_hash)
        for sub in SUBDIRS:
            (out_dir / sub).mkdir(parents=True, exist_ok=True)
        remove_orphans(out_dir, shards)
        self.next_shard = max((int(s.removeprefix("part-")) for s in shards), default=-1) + 1
        if not self.manifest.exists():
            _append(self.manifest, {"kind": "header", "config_hash": config_hash, "created": time.time()})
        _atomic_write(out_dir / "errors" / "input.jsonl", [e.to_json() for e in input_errors])
        self.buffer: list[PromptState] = []
        self.last_commit = time.monotonic()

    def write(self, states: list[PromptState]) -> None:
        self.buffer.extend(states)
        while len(self.buffer) >= self.shard_size:
            self._commit(self.buffer[: self.shard_size])
            self.buffer = self.buffer[self.shard_size :]
        if self.buffer and time.monotonic() - self.last_commit >= self.flush_interval_s:
            self._commit(self.buffer)
            self.buffer = []

    def close(self) -> None:
        if self.buffer:
            self._commit(self.buffer)
            self.buffer = []

    def _commit(self, states: list[PromptState]) -> None:
        name = f"part-{self.next_shard:05d}"
        ok = [s for s in states if s.error is None]
        failed = [s for s in states if s.error is not None]
        _atomic_write(self.dir / "data" / f"{name}.jsonl", [s.output_row() for s in ok])
        _atomic_write(self.dir / "sft" / f"{name}.jsonl", [s.sft_row() for s in ok])
        _atomic_write(self.dir / "errors" / f"{name}.jsonl", [s.error_row() for s in failed])
        _append(self.manifest, {"kind": "shard", "shard": name, "ids": [s.id for s in ok], "failed": [s.id for s in failed]})
        self.done_ids.update(s.id for s in states)
        self.next_shard += 1
        self.last_commit = time.monotonic()
        log.debug("committed %s: %d rows, %d failed", name, len(ok), len(failed))


def read_manifest(path: Path, config_hash: str) -> tuple[set[str], list[str]]:
    """(ids already committed, shard names committed); checks the job's config did not change."""
    done: set[str] = set()
    shards: list[str] = []
    if not path.exists():
        return done, shards
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # torn by a crash mid-append: that shard never committed
                log.warning("dropping a torn last line of %s (an interrupted commit)", path)
                _replace(path, lambda f: f.writelines(line + "\n" for line in lines[:i]))
                break
            raise ConfigError(f"{path}:{i + 1} is corrupt; this output directory cannot be resumed") from None
        if entry.get("kind") == "header":
            if entry["config_hash"] != config_hash:
                raise ConfigError(
                    f"{path.parent} was written with config {entry['config_hash']}, this run's config is {config_hash}; "
                    "resume with the same config and overrides, or choose a new --output-dir"
                )
        elif entry.get("kind") == "shard":
            shards.append(entry["shard"])
            done.update(entry["ids"])
            done.update(entry["failed"])
    return done, shards


def remove_orphans(out_dir: Path, committed: list[str]) -> None:
    keep = {f"{s}.jsonl" for s in committed} | {"input.jsonl"}
    for sub in SUBDIRS:
        for f in (out_dir / sub).iterdir():
            if f.name not in keep:
                log.info("removing %s: not in the manifest (an interrupted commit)", f)
                f.unlink()


def _atomic_write(path: Path, rows: list[dict]) -> None:
    _replace(path, lambda f: write_lines(f, rows))


def _replace(path: Path, fill: Callable[[IO[str]], None]) -> None:
    """Write a file under a temporary name, fsync it, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        fill(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _append(path: Path, entry: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())
