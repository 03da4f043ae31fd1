"""Prompt files by URI into Ray Data: read and parsed on the workers, only ids reach the driver.

`read_input(uri, ...)` lists the input (one file, or every .jsonl/.jsonl.gz/.parquet under a
folder or prefix, on any filesystem `engine.storage` resolves), reads each file in a Ray Data task
(the bytes as stored: fescale inflates a .gz itself, so a corrupt one is an error row of its file
where Ray Data's own reader would fail the job) and parses each line or Parquet row on the workers
with `engine.inputs.parse_line` / `parse_row`. A malformed row becomes an error row (stage "input",
id `source:line`) that flows to the errors files like a failed prompt, so it is recorded once and
skipped on resume. The driver sees only (id, source, line) of each row, to drop duplicates, skip what
an earlier run committed and apply `--limit`; the prompts themselves stay in the object store.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
import ray

from actors.errors import InputError
from engine.inputs import InputErrorRow, Prompt, parquet_rows, parse_line, parse_row
from engine.rows import Message, PromptState, RowError
from engine.storage import resolve, storage_error

EXTENSIONS = (".jsonl", ".jsonl.gz", ".json", ".parquet")


@dataclass
class InputCounts:
    """What the driver learned of the input: valid prompts to run, malformed rows, resumed ids."""

    prompts: int = 0
    input_errors: int = 0
    resumed: int = 0


def list_inputs(uri: str) -> tuple[object, list[str]]:
    """(filesystem, file paths): the file itself, or the prompt files under a folder, in name order."""
    import pyarrow.fs as pafs

    loc = resolve(uri)
    try:
        info = loc.fs.get_file_info(loc.path)
        found = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True)) if info.type == pafs.FileType.Directory else []
    except OSError as e:
        raise storage_error(uri, e) from None
    if info.type == pafs.FileType.File:
        return loc.fs, [loc.path]
    if info.type == pafs.FileType.Directory:
        paths = sorted(f.path for f in found if f.type == pafs.FileType.File and f.path.endswith(EXTENSIONS))
        if paths:
            return loc.fs, paths
        raise InputError(f"input {uri} holds no prompt files ({', '.join(EXTENSIONS)})")
    raise InputError(f"input {uri} does not exist")


def _read_file(row: dict, fs) -> list[dict]:
    """One input file's rows; a file that cannot be read is one error row (line 0), not a failed job."""
    path = row["path"]
    try:
        with fs.open_input_stream(path, compression=None) as f:
            data = f.readall()
    except OSError as e:
        return [_row(InputErrorRow(path, 0, f"file unreadable: {e}"), path)]
    return _parse_file(path, data)


def _parse_file(path: str, data: bytes) -> list[dict]:
    """One input file's bytes -> one row per line (or Parquet row): the prompt, or why it is malformed."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        rows, line = [], 1
        try:
            for batch in pq.ParquetFile(io.BytesIO(data)).iter_batches():
                rows += [_row(parse_row(record, n, path), path) for n, record in parquet_rows(batch, line)]
                line += batch.num_rows
        except Exception as e:  # a corrupt file: the rows read so far stand, the rest is one error
            rows.append(_row(InputErrorRow(path, line, f"Parquet file unreadable from here on: {type(e).__name__}: {e}"), path))
        return rows
    if path.endswith(".gz"):
        import gzip

        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            return [_row(InputErrorRow(path, 0, f"not a readable gzip file: {e}"), path)]
    parsed = (parse_line(raw, n, path) for n, raw in enumerate(data.split(b"\n"), start=1))
    return [_row(p, path) for p in parsed if p is not None]  # None: a blank line


def _row(parsed: Prompt | InputErrorRow, source: str) -> dict:
    if isinstance(parsed, Prompt):
        return {"id": parsed.id, "source": source, "line": parsed.line, "messages": json.dumps(parsed.messages), "error": ""}
    return {"id": f"{parsed.source}:{parsed.line}", "source": parsed.source, "line": parsed.line, "messages": "", "error": parsed.error}


@ray.remote(num_cpus=0)
def _keys(block) -> dict[str, list]:
    """What the driver needs of one parsed block: its rows' ids, lines and errors, not the prompts."""
    return {name: block.column(name).to_pylist() for name in ("id", "line", "error")}


class _ToStates:
    """One chunk of kept rows (a block of parsed input and row positions in it) -> pipeline rows
    `{id, state}`; a position with a duplicate id becomes an input error with that id."""

    def __init__(self, blocks: list, mode: str, config_hash: str):
        self.blocks, self.mode, self.config_hash = blocks, mode, config_hash

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        ids, states = [], []
        for block, positions, duplicate_ids in zip(batch["block"], batch["positions"], batch["duplicates"]):
            rows = ray.get(self.blocks[block]).take(list(positions)).to_pylist()
            for row, duplicate_id in zip(rows, duplicate_ids):
                row_id, error = row["id"], row["error"]
                if duplicate_id:
                    row_id, error = duplicate_id, f"duplicate id {row['id']!r}"
                messages = [] if error else [Message(**m) for m in json.loads(row["messages"])]
                state = PromptState(id=row_id, messages=messages, mode=self.mode, config_hash=self.config_hash)
                if error:
                    state.error = RowError(stage="input", message=error)
                ids.append(row_id)
                states.append(state.to_json())
        return {"id": ids, "state": states}


def read_input(
    uri: str, files: tuple[object, list[str]], mode: str, config_hash: str, done: set[str], limit: int | None, num_cpus: float,
    batch_size: int,
) -> tuple[ray.data.Dataset, InputCounts]:
    """The prompts of `uri` (its `files`, from `list_inputs`) not in `done`, as pipeline rows in blocks
    of `batch_size`; at most `limit` valid prompts.

    A file is one block of parsed rows. Ray Data runs one task per block, so the kept rows are
    regrouped into blocks of one batch each: that is what lets the stage's batches run concurrently and
    the first shards be written while later prompts still generate."""
    fs, paths = files
    files_ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths))
    blocks = files_ds.flat_map(_read_file, fn_kwargs={"fs": fs}, num_cpus=num_cpus).materialize().to_arrow_refs()
    counts, seen, kept = InputCounts(), set(), []  # kept: (block, position, duplicate id or "")
    for b, keys in enumerate(ray.get([_keys.remote(ref) for ref in blocks])):
        for position, (row_id, line, error) in enumerate(zip(keys["id"], keys["line"], keys["error"])):
            if error:  # malformed: recorded once (its id is SOURCE:LINE), skipped on resume
                if row_id not in done:
                    counts.input_errors += 1
                    kept.append((b, position, ""))
            elif row_id in seen:  # the first row with an id wins; a later one is an input error
                if f"{uri}:{line}" not in done:
                    counts.input_errors += 1
                    kept.append((b, position, f"{uri}:{line}"))
            else:
                seen.add(row_id)
                if row_id in done:
                    counts.resumed += 1
                elif limit is None or counts.prompts < limit:
                    counts.prompts += 1
                    kept.append((b, position, ""))
    chunks = []
    for start in range(0, len(kept), batch_size):
        chunk = kept[start : start + batch_size]
        for b in dict.fromkeys(k[0] for k in chunk):  # a chunk never mixes blocks
            mine = [k for k in chunk if k[0] == b]
            chunks.append({"block": b, "positions": [k[1] for k in mine], "duplicates": [k[2] for k in mine]})
    rows = ray.data.from_items(chunks or [{"block": 0, "positions": [], "duplicates": []}], override_num_blocks=max(1, len(chunks)))
    return rows.map_batches(_ToStates(blocks, mode, config_hash), batch_size=1, batch_format="numpy", num_cpus=num_cpus), counts
