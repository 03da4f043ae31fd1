"""`fescale distill`: mass-produce output and SFT data on any filesystem, resumable, every prompt once.

Layout of `--output-dir OUT` (a local path or a URI such as s3://bucket/run):
    OUT/job.json             the job's config hash and format (a resume must match them)
    OUT/config.yaml          the resolved config
    OUT/manifest/NAME.json   one per committed shard: its ids, failed ids and row counts
    OUT/data/NAME.EXT        output rows (EXT: jsonl or parquet, `--format`)
    OUT/sft/NAME.EXT         SFT rows ({id, messages} ending with the final answer)
    OUT/errors/NAME.jsonl    prompts that failed ({id, stage, error}; malformed input rows have stage
                             "input" and id SOURCE:LINE)
    OUT/summary.json         the last run's summary
    OUT/_fescale.lock        while a job runs (a second job on OUT is refused)

Shards are written on the workers (`engine.shards.WriteShards`); the manifest entries are the truth.
On (re)start the job verifies every listed shard (its files present with the listed row counts),
skips the ids it lists, and deletes only files that carry fescale's shard naming pattern and no
manifest entry (a kill between a shard's files and its entry). Any other file under OUT is left
where it is. So a kill at any instant loses at most the shards in flight, which the rerun redoes.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections import Counter

from actors.errors import BackendError, ConfigError
from engine.config import FescaleConfig
from engine.runner import init_ray, run_stream
from engine.shards import SHARD_NAME, SUBDIRS, Format, WriteShards, count_rows
from engine.sources import list_inputs, read_input
from engine.storage import Location, OutputLock, delete, listing, read_bytes, resolve, write_bytes
from engine.summary import Summary

log = logging.getLogger("fescale")
ALL_FAILED_AFTER = 32  # this many finished prompts, none answered: the job is broken, not the prompts


def committed(out: Location, fmt: Format) -> tuple[set[str], set[str]]:
    """(ids done, shard names) of the verified manifest entries; an entry whose files are missing
    or short is dropped (its prompts are redone) with a warning."""
    done: set[str] = set()
    shards: set[str] = set()
    for name, _ in listing(out.join("manifest")):
        match = SHARD_NAME.match(name)
        if not match or not name.endswith(".json"):
            continue
        shard = match.group(1)
        entry = json.loads(read_bytes(out.join("manifest", name)) or b"{}")
        problem = _verify(out, shard, entry, fmt)
        if problem:
            log.warning("shard %s is listed but %s; dropping its entry and redoing its prompts", shard, problem)
            delete(out.join("manifest", name))
            continue
        shards.add(shard)
        done.update(entry["ids"])
        done.update(entry["failed"])
    return done, shards


def _verify(out: Location, shard: str, entry: dict, fmt: Format) -> str | None:
    for sub, rows in entry.get("rows", {}).items():
        ext = "jsonl" if sub == "errors" else fmt
        data = read_bytes(out.join(sub, f"{shard}.{ext}"))
        if data is None:
            return f"{sub}/{shard}.{ext} is missing"
        if count_rows(data, ext) != rows:
            return f"{sub}/{shard}.{ext} does not hold its {rows} rows"
    return None


def remove_orphans(out: Location, shards: set[str]) -> None:
    """Delete shard files no manifest entry lists (a kill mid-commit); never anything not fescale's."""
    for sub in SUBDIRS:
        for name, _ in listing(out.join(sub)):
            match = SHARD_NAME.match(name)
            if match and match.group(1) not in shards:
                log.info("removing %s/%s: not in the manifest (an interrupted commit)", sub, name)
                delete(out.join(sub, name))


def open_job(out: Location, cfg: FescaleConfig, fmt: Format) -> None:
    """Check a resumed job is the same job (config and format), or record a new one."""
    if read_bytes(out.join("manifest.jsonl")) is not None:
        raise ConfigError(f"{out} was written by an older fescale (manifest.jsonl); choose a new --output-dir")
    job = {"config_hash": cfg.config_hash(), "format": fmt}
    found = read_bytes(out.join("job.json"))
    if found is None:
        write_bytes(out.join("job.json"), json.dumps({**job, "created": time.time()}).encode())
        write_bytes(out.join("config.yaml"), cfg.to_yaml().encode())
        return
    previous = json.loads(found)
    if previous.get("config_hash") != job["config_hash"]:
        raise ConfigError(
            f"{out} was written with config {previous.get('config_hash')}, this run's config is {job['config_hash']}; "
            "resume with the same config and overrides, or choose a new --output-dir"
        )
    if previous.get("format") != fmt:
        raise ConfigError(f"{out} holds --format {previous.get('format')} shards; resume with the same --format or choose a new --output-dir")


def distill(
    cfg: FescaleConfig,
    input_uri: str,
    output_uri: str,
    *,
    fmt: Format = "jsonl",
    shard_size: int = 64,
    limit: int | None = None,
    address: str | None = None,
    progress: bool = True,
) -> Summary:
    """Run the config over every prompt of `input_uri` not yet committed under `output_uri`."""
    files = list_inputs(input_uri)  # a bad input is an error before the output is touched
    out = resolve(output_uri)
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "ray_job": _submission_id(), "started": time.time()}
    with OutputLock(out, owner):
        open_job(out, cfg, fmt)
        done, shards = committed(out, fmt)
        remove_orphans(out, shards)
        init_ray(cfg, address)
        rows, counts = read_input(input_uri, files, cfg.mode, cfg.config_hash(), done, limit, cfg.pipeline.stage_num_cpus, cfg.pipeline.batch_size)
        log.info(
            "%d prompts: %d already written by an earlier run, %d to go (%d malformed input rows)",
            counts.prompts + counts.resumed, counts.resumed, counts.prompts, counts.input_errors,
        )
        summary = Summary(cfg.mode, cfg.config_hash(), input_errors=counts.input_errors, resumed=counts.resumed)
        failures: Counter = Counter()

        def on_batch(batch) -> int:
            for stats in map(json.loads, batch["stats"]):
                if stats.get("stage") == "input":
                    continue
                summary.add_stats(stats)
                if stats["failed"]:
                    failures[stats["error"]] += 1
            if summary.prompts == 0 and summary.failed >= ALL_FAILED_AFTER:
                reason, n = failures.most_common(1)[0]
                raise BackendError(f"the first {summary.failed} prompts all failed ({n} with: {reason}); stopping instead of failing every prompt")
            return len(batch["id"])

        writer = dict(fn=WriteShards, fn_constructor_kwargs={"out": out, "fmt": fmt, "config_hash": cfg.config_hash()})
        if counts.prompts + counts.input_errors:  # else all done already: start no model
            run_stream(cfg, rows, counts.prompts + counts.input_errors, summary, on_batch, finish=(writer, shard_size), progress=progress)
        summary.finish()
        write_bytes(out.join("summary.json"), json.dumps(summary.to_dict(), indent=2).encode())
    return summary


def _submission_id() -> str | None:
    """The `ray job submit` id this driver runs under (Ray passes it in the job config), for the lock."""
    config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    return (config.get("metadata") or {}).get("job_submission_id")
