"""`fescale score`: the configured reward scorer's score of each (conversation, response) row of a file.

Rows are read by `engine.inputs.read_rows` (the one reader of JSONL, .jsonl.gz and Parquet) and
checked by the same functions as `fescale run`'s prompts, so every hostile input (bytes that are not
UTF-8, lone surrogates, integers past Python's digit limit, nesting past its parser, wrong types,
missing or empty fields, duplicate ids) becomes one line in the errors file and the job goes on.
A row is a prompt in any shape `fescale run` reads (`messages` ending with a user turn, `prompt`,
Arena-Hard `turns`, HelpSteer3 `context`) plus `response`, the answer to score (a non-empty string);
`id` is optional (default: a hash of prompt and response, so a rerun gives the same ids).

Scores come from `SelectStep.score`, the very code that picks the final answer in a run, on the
reward role's pool (`engine.pools.Pools`: real replicas on Ray, only the reward model is loaded):
`token_logit` (the raw logit of `select.token_id`: Nemotron-70B-Reward, Select),
`sequence_classification` and `logit_judge`. The generative scorer compares candidates with each
other and has no score of one response alone, so it is refused.

Output, in input order: `{id, score}` per row, JSONL or Parquet by the output's extension (join it
back to the input on `id`); `<output>.errors.jsonl` gets `{id, line, error}` per row that was not
scored (an id that cannot be read is `FILE:LINE`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

from actors.errors import BackendError, ConfigError, InputError, PromptError, last_line
from engine.config import FescaleConfig
from engine.inputs import check_content, read_rows, to_prompt
from engine.rows import Message, PromptState
from engine.shards import encode
from engine.sinks import write_lines
from engine.steps import SelectStep
from engine.storage import resolve, write_bytes

log = logging.getLogger("fescale")

FORMATS = {".jsonl": "jsonl", ".parquet": "parquet"}
SCHEMA = pa.schema([("id", pa.string()), ("score", pa.float64())])
ID_FIELDS = ("id", "question_id", "uid")  # as `engine.inputs.to_prompt` reads them


@dataclass(frozen=True)
class ScoreRow:
    id: str
    messages: list[dict]
    response: str
    line: int


@dataclass(frozen=True)
class Failure:
    """A row that got no score: its id (or FILE:LINE), line and a one-line reason."""

    id: str
    line: int
    error: str

    def to_json(self) -> dict:
        return {"id": self.id, "line": self.line, "error": self.error}


@dataclass
class ScoreCounts:
    scored: int = 0
    input_errors: int = 0  # rows that could not be read or checked
    failed: int = 0  # valid rows the scorer could not score (too long for the model, say)


def scoring_config(cfg: FescaleConfig) -> FescaleConfig:
    """The config as a scorer: its reward role and `select:` section, whatever its mode (a mode
    without a select step, greedy say, still names the reward model to use). best_of_n is the mode
    whose roles are the generator and the reward: only the reward's pool is started."""
    if cfg.select.scorer == "generative":
        raise ConfigError(
            "select.scorer generative ranks candidates against each other and has no score for one response; "
            "use token_logit, sequence_classification or logit_judge"
        )
    return cfg.model_copy(update={"mode": "best_of_n"})


def output_format(output: Path) -> str:
    fmt = FORMATS.get(output.suffix)
    if fmt is None:
        raise ConfigError(f"--output {output}: the extension picks the format, use .jsonl or .parquet")
    return fmt


def errors_path(output: Path) -> Path:
    """out.jsonl / out.parquet -> out.errors.jsonl"""
    return output.with_name(output.name.removesuffix(output.suffix) + ".errors.jsonl")


def parse_score_row(row: Any, line: int, source: str) -> ScoreRow | Failure:
    """A decoded row (or the `InputError` decoding it raised) -> its `ScoreRow`, or its `Failure`; never raises."""
    try:
        if isinstance(row, Exception):
            raise row
        prompt = to_prompt(row, line)  # the row is an object with a valid prompt and id from here on
        if "response" not in row:
            raise InputError("row needs `response`, the answer to score (a non-empty string)")
        response = check_content(row["response"], "response")
        if any(row.get(k) is not None for k in ID_FIELDS):
            row_id = prompt.id
        else:  # to_prompt's hash covers the prompt only: two answers to one prompt need two ids
            row_id = hashlib.sha256(json.dumps([prompt.messages, response], sort_keys=True).encode()).hexdigest()[:16]
        return ScoreRow(row_id, prompt.messages, response, line)
    except InputError as e:
        return Failure(_id_of(row, source, line), line, str(e))
    except Exception as e:  # a shape no check foresaw: still this row's error, not the job's
        return Failure(_id_of(row, source, line), line, f"row cannot be read: {type(e).__name__}: {last_line(e)}")


def _id_of(row: Any, source: str, line: int) -> str:
    """The id of a failed row where it is readable, else FILE:LINE (as `fescale run`'s input errors)."""
    if isinstance(row, dict):
        value = next((row[k] for k in ID_FIELDS if k in row), None)
        if isinstance(value, str) and value.strip() or (isinstance(value, int) and not isinstance(value, bool)):
            return str(value)
    return f"{source}:{line}"


def read_score_rows(path: Path) -> Iterator[ScoreRow | Failure]:
    """The file's rows in order, checked; a repeated id is a failure of the later row."""
    first: dict[str, int] = {}
    for line, row in read_rows(path):
        parsed = parse_score_row(row, line, str(path))
        if isinstance(parsed, ScoreRow):
            if parsed.id in first:
                parsed = Failure(f"{path}:{line}", line, f"duplicate id {parsed.id[:80]!r} (first at line {first[parsed.id]})")
            else:
                first[parsed.id] = line
        yield parsed


def score_file(cfg: FescaleConfig, input_path: str | Path, output_path: str | Path, *, pools=None, progress: bool = True) -> ScoreCounts:
    """Score every row of `input_path` into `output_path` (+ its errors file); starts (and stops) the
    reward pool unless running `pools` covering the reward role are given. A `BackendError` or
    `ConfigError` (a model gone, a wrong setting) stops the job: it would fail every row alike."""
    from tqdm import tqdm

    from engine.pools import Pools

    cfg = scoring_config(cfg)
    source, output = Path(input_path), Path(output_path)
    fmt = output_format(output)
    if not source.is_file():
        raise InputError(f"input file {source} does not exist")
    if source.resolve() in (output.resolve(), errors_path(output).resolve()):
        raise ConfigError(f"--output {output} would overwrite the input {source}; write elsewhere")
    output.parent.mkdir(parents=True, exist_ok=True)
    owned = pools is None
    if owned:
        pools = Pools(cfg, roles=["reward"])
        pools.start()
    try:
        step = SelectStep(cfg.select, pools.client("reward"))
        with tqdm(desc="fescale score", unit="row", disable=not progress) as bar:
            return asyncio.run(_run(cfg, step, source, output, fmt, bar))
    finally:
        if owned:
            pools.shutdown()


async def _run(cfg: FescaleConfig, step: SelectStep, source: Path, output: Path, fmt: str, bar) -> ScoreCounts:
    """Rows in windows of `pipeline.batch_size x max_concurrent_batches` scored concurrently (the
    pool client merges them into batched replica calls), each window written before the next is read."""
    window = cfg.pipeline.batch_size * cfg.pipeline.max_concurrent_batches
    counts, table = ScoreCounts(), []
    config_hash = cfg.config_hash()
    jsonl_out = open(output, "w", encoding="utf-8") if fmt == "jsonl" else contextlib.nullcontext()  # Parquet: once, at the end
    with open(errors_path(output), "w", encoding="utf-8") as errors, jsonl_out as out:
        rows: list[ScoreRow | Failure] = []
        for item in itertools.chain(read_score_rows(source), [None]):  # None: the end flushes the last window
            if item is not None:
                rows.append(item)
                if len(rows) < window:
                    continue
            scored = iter(await asyncio.gather(*(_score_one(step, r, cfg.mode, config_hash) for r in rows if isinstance(r, ScoreRow))))
            done, failed = [], []
            for r in rows:
                if isinstance(r, Failure):  # unreadable or invalid
                    counts.input_errors += 1
                    failed.append(r)
                    continue
                outcome = next(scored)
                counts.failed += isinstance(outcome, Failure)
                (failed if isinstance(outcome, Failure) else done).append(outcome)
            counts.scored += len(done)
            write_lines(errors, (f.to_json() for f in failed))
            errors.flush()
            if out is not None:
                write_lines(out, done)
                out.flush()
            table += done
            bar.update(len(rows))
            rows = []
    if fmt == "parquet":
        write_bytes(resolve(str(output)), encode(table, "parquet", SCHEMA))  # atomic: a reader never sees half a file
    return counts


async def _score_one(step: SelectStep, row: ScoreRow, mode: str, config_hash: str) -> dict | Failure:
    """One row's `{id, score}`, or its failure. What fails for one row fails only its row, as in the
    pipeline's stage actor: a `PromptError` with its message, anything else but a `BackendError` or
    `ConfigError` as an internal error."""
    state = PromptState(id=row.id, messages=[Message(**m) for m in row.messages], mode=mode, config_hash=config_hash)
    try:
        [score] = await step.score(state, [row.response])
    except PromptError as e:
        return Failure(row.id, row.line, last_line(e))
    except (BackendError, ConfigError):
        raise
    except Exception as e:
        log.debug("row %s: scoring failed", row.id, exc_info=True)
        return Failure(row.id, row.line, f"internal error in score: {type(e).__name__}: {last_line(e)}")
    return {"id": row.id, "score": score}
