"""Distillation shards: the files one batch of finished prompts becomes, written where they are made.

`WriteShards` is the last Ray Data stage of `fescale distill`. Ray Data bundles finished rows into
batches of `--shard-size`; each call writes one shard next to the data (on a worker, straight to the
output filesystem: no row passes through the driver) and returns one small row per prompt for the
driver's progress and summary. A shard commits in this order:
    data/NAME.EXT, sft/NAME.EXT, errors/NAME.jsonl   (each atomic: renamed into place, or one PUT)
    manifest/NAME.json                                 (the commit point: ids, failed ids, row counts)
A crash between the two leaves files the manifest does not list; they match fescale's own naming
pattern (`SHARD_NAME`), so a resume deletes them and redoes their prompts. Nothing else is deleted.

Formats: `jsonl` (one output row per line) or `parquet` (the explicit `OUTPUT_SCHEMA`, the same in
every shard, so a folder of shards reads as one table).
"""

from __future__ import annotations

import io
import json
import re
import uuid
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from actors.heap import freeze_startup_heap
from engine.rows import PromptState
from engine.storage import Location, write_bytes
from engine.summary import row_stats

Format = Literal["jsonl", "parquet"]
SUBDIRS = ("data", "sft", "errors", "manifest")
SHARD_NAME = re.compile(r"^(part-[0-9a-f]{16})\.(jsonl|parquet|json)$")  # only these are ever deleted

_MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
_EDIT = pa.struct([("text", pa.string()), ("finish_reason", pa.string()), ("feedback_set", pa.int64()), ("score", pa.float64())])
_FEEDBACK = pa.struct([("text", pa.string()), ("level", pa.string()), ("keywords", pa.int64()), ("kept", pa.bool_())])
_CANDIDATE = pa.struct(
    [
        ("text", pa.string()),
        ("finish_reason", pa.string()),
        ("score", pa.float64()),
        ("feedback", pa.list_(_FEEDBACK)),
        ("feedback_sets", pa.list_(pa.list_(pa.int64()))),
        ("edits", pa.list_(_EDIT)),
    ]
)
_USAGE = pa.struct([("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64())])
OUTPUT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("messages", _MESSAGES),
        ("mode", pa.string()),
        ("config_hash", pa.string()),
        ("final", pa.string()),
        ("selected", pa.struct([("response", pa.int64()), ("feedback_set", pa.int64()), ("edit", pa.int64()), ("score", pa.float64())])),
        ("candidates", pa.list_(_CANDIDATE)),
        ("usage", pa.map_(pa.string(), _USAGE)),
    ]
)
SFT_SCHEMA = pa.schema([("id", pa.string()), ("messages", _MESSAGES)])


def encode(rows: list[dict], fmt: Format, schema: pa.Schema) -> bytes:
    """Rows as one file's bytes: JSON lines, or a Parquet file with the fixed schema."""
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    rows = [{**r, "usage": list(r["usage"].items())} for r in rows] if "usage" in schema.names else rows
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer)
    return buffer.getvalue()


def count_rows(data: bytes, fmt: Format) -> int:
    """Rows in a shard file's bytes (resume checks every listed shard against its manifest entry)."""
    if fmt == "jsonl":
        return data.count(b"\n")
    return pq.read_metadata(io.BytesIO(data)).num_rows


class WriteShards:
    """The writing stage: one shard per call, then one small row per prompt back to the driver."""

    def __init__(self, out: Location, fmt: Format, config_hash: str):
        self.out, self.fmt, self.config_hash = out, fmt, config_hash
        freeze_startup_heap()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        states = [PromptState.from_json(s) for s in batch["state"]]
        name = f"part-{uuid.uuid4().hex[:16]}"
        ok = [s for s in states if s.error is None]
        failed = [s for s in states if s.error is not None]
        files = {
            "data": (f"{name}.{self.fmt}", encode([s.output_row() for s in ok], self.fmt, OUTPUT_SCHEMA)),
            "sft": (f"{name}.{self.fmt}", encode([s.sft_row() for s in ok], self.fmt, SFT_SCHEMA)),
            "errors": (f"{name}.jsonl", encode([s.error_row() for s in failed], "jsonl", pa.schema([]))),
        }
        for sub, (filename, data) in files.items():
            write_bytes(self.out.join(sub, filename), data)
        entry = {
            "shard": name,
            "config_hash": self.config_hash,
            "format": self.fmt,
            "ids": [s.id for s in ok],
            "failed": [s.id for s in failed],
            "rows": {"data": len(ok), "sft": len(ok), "errors": len(failed)},
        }
        write_bytes(self.out.join("manifest", f"{name}.json"), json.dumps(entry).encode())
        return {"id": [s.id for s in states], "stats": [json.dumps(row_stats(s)) for s in states]}
