"""Read prompts: JSONL (plain, Arena-Hard, HelpSteer3; optionally .gz) and Parquet.

Each row becomes `(id, messages)`. Accepted row shapes, checked in this order:
- `messages`: a list of `{role, content}` ending with a user turn (`id` optional);
- `prompt`: a string, sent as one user turn (`id` optional);
- Arena-Hard v0.1 `question_id` + `turns: [{content}]` (the first turn), or v2.0 `uid` + `prompt`;
- HelpSteer3 `context` (its list of turns).
Rows without an id get a content hash, so reruns and resumes see the same ids. A malformed row is
never silently dropped: it is returned as an error with its line number and the job goes on.

This is the edge where Python's limits meet users' files (../shared/stack.md), so each is turned
into that one line's error here rather than a traceback later: bytes that are not UTF-8 (lines are
decoded one by one, not by a text-mode file that fails the whole read), lone surrogates (`"\\ud800"`
parses but cannot be written out as UTF-8: the sink would crash mid-job), integers over
`sys.get_int_max_str_digits()` digits (ValueError) and nesting deeper than the parser's recursion
limit (RecursionError). Parquet strings are not UTF-8-checked by Arrow either, so its rows are
converted one by one when a batch will not convert. `parse_line` is the pure per-line function a
reader of any filesystem can call on raw bytes; `read_prompts` is the local-file reader built on it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import reprlib
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from actors.errors import InputError

DEMO_PROMPTS = Path(__file__).resolve().parent / "data" / "prompts.jsonl"  # the bundled prompts `fescale run` answers

ROLES = {"system", "user", "assistant"}
BLANK = object()  # `load_line` of a line holding only whitespace: skipped, not an error
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # the only way a strictly decoded line can hold one
_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 40
_show = _repr.repr  # a user's value in a message: short, one line, escaped


@dataclass(frozen=True)
class Prompt:
    id: str
    messages: list[dict]
    line: int


@dataclass(frozen=True)
class InputErrorRow:
    source: str
    line: int
    error: str

    def to_json(self) -> dict:
        return {"source": self.source, "line": self.line, "stage": "input", "error": self.error}


def read_prompts(path: str | Path, limit: int | None = None) -> tuple[list[Prompt], list[InputErrorRow]]:
    """All valid prompts of a local file (up to `limit`) and one error per malformed row."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"input file {path} does not exist")
    prompts: list[Prompt] = []
    errors: list[InputErrorRow] = []
    first_line: dict[str, int] = {}
    for line, row in read_rows(path):
        if limit is not None and len(prompts) >= limit:
            break
        parsed = parse_row(row, line, str(path))
        if isinstance(parsed, Prompt) and parsed.id in first_line:
            parsed = InputErrorRow(str(path), line, f"duplicate id {_show(parsed.id)} (first at line {first_line[parsed.id]})")
        if isinstance(parsed, InputErrorRow):
            errors.append(parsed)
            continue
        first_line[parsed.id] = line
        prompts.append(parsed)
    return prompts, errors


def parse_line(raw: bytes, line: int, source: str) -> Prompt | InputErrorRow | None:
    """One JSONL line's bytes (its newline may be left on) -> its `Prompt`, its one-line error, or None
    for a blank line. Pure and total: it never raises, whatever the bytes, so a reader on any
    filesystem can map it over lines. Duplicate ids span lines: they are the caller's to check."""
    try:
        row = load_line(raw)
    except Exception as e:
        row = e
    return None if row is BLANK else parse_row(row, line, source)


def parse_row(row: Any, line: int, source: str) -> Prompt | InputErrorRow:
    """A decoded row (or the exception decoding it raised, as `read_rows` yields it) -> its `Prompt`
    or its one-line error; never raises."""
    try:
        if isinstance(row, Exception):
            raise row
        return to_prompt(row, line)
    except InputError as e:
        return InputErrorRow(source, line, str(e))
    except Exception as e:  # a shape no check foresaw: still this row's error, not the job's
        return InputErrorRow(source, line, f"row cannot be read: {type(e).__name__}: {_first_line(e)}")


def read_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line, row) of a local JSONL (.gz) or Parquet file; a row that cannot be decoded is its `InputError`.

    A file that cannot be read as its kind at all is an `InputError` (the job stops before any work);
    one that breaks part way (a cut .gz, a corrupt row group) ends in one error row saying from which
    line on it is unreadable, and the rows before it stand."""
    line = 0
    try:
        for line, row in _parquet_rows(path) if path.suffix == ".parquet" else _jsonl_rows(path):
            yield line, row
    except InputError:
        raise
    except (OSError, EOFError, zlib.error, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        if line == 0:
            raise InputError(f"{path} cannot be read as {_kind(path)}: {type(e).__name__}: {_first_line(e)}") from None
        yield line + 1, InputError(f"file unreadable from here on ({type(e).__name__}: {_first_line(e)})")


def _kind(path: Path) -> str:
    return {".parquet": "Parquet", ".gz": "gzipped JSONL"}.get(path.suffix, "JSONL")


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:  # bytes, split on b"\n" only, as JSONL is
        for line, raw in enumerate(f, start=1):
            try:
                row = load_line(raw)
            except InputError as e:
                row = e
            if row is not BLANK:
                yield line, row


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    line = 1
    with pq.ParquetFile(path) as f:
        for batch in f.iter_batches():
            yield from parquet_rows(batch, line)
            line += batch.num_rows


def parquet_rows(batch, first_line: int) -> Iterator[tuple[int, Any]]:
    """(line, row) of an Arrow record batch, lines counted from `first_line`. A row Arrow cannot turn
    into Python values (a string that is not UTF-8, a timestamp past year 9999) is its `InputError`
    naming the column, and the batch's other rows still convert."""
    try:
        rows = batch.to_pylist()
    except Exception:  # one bad value fails the whole batch's conversion: convert it row by row
        rows = [_arrow_row(batch, j) for j in range(batch.num_rows)]
    yield from enumerate(rows, start=first_line)


def _arrow_row(batch, j: int) -> dict | InputError:
    row = {}
    for name in batch.schema.names:
        try:
            row[name] = batch.column(name)[j].as_py()
        except UnicodeDecodeError as e:
            return InputError(f"`{name}` is not valid UTF-8 ({e.reason} at byte {e.start})")
        except Exception as e:
            return InputError(f"`{name}` cannot be read: {type(e).__name__}: {_first_line(e)}")
    return row


def load_line(raw: bytes) -> Any:
    """One JSONL line's bytes -> its JSON value, or `BLANK`; anything Python cannot hold or write out
    again is an `InputError` with a one-line message naming the field where there is one."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"not valid UTF-8 ({e.reason}: byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
    text = text.removeprefix("\ufeff")  # a BOM (Windows editors write one at the start of a file)
    if not text or text.isspace():
        return BLANK
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise InputError(_too_deep(text)) from None
    except ValueError:  # the only other ValueError json.loads raises: an integer over the digit limit
        raise InputError(_too_long(text)) from None
    if _SURROGATE_ESCAPE.search(text):
        found = _find(row, lambda v: isinstance(v, str) and _SURROGATE.search(v) is not None)
        if found:
            path, value = found
            at = _SURROGATE.search(value).start()  # type: ignore[union-attr]
            raise InputError(f"{path} is not valid Unicode (lone surrogate at position {at})")
    return row


def _too_long(text: str) -> str:
    """Which field holds the integer over Python's digit limit (found by parsing again, only now)."""
    limit = sys.get_int_max_str_digits()

    class Digits(int):  # the too-long integer's stand-in, so the parse can finish and the walk find it
        pass

    try:
        row = json.loads(text, parse_int=lambda s: int(s) if len(s.lstrip("-")) <= limit else Digits(len(s.lstrip("-"))))
        path, digits = _find(row, lambda v: isinstance(v, Digits)) or ("a value", 0)
    except (ValueError, RecursionError):
        path, digits = "a value", 0
    size = f"{digits} digits" if digits else f"over {limit} digits"
    return f"{path} is an integer of {size}; Python reads at most {limit}"


def _too_deep(text: str) -> str:
    """Where a line nests too deep for the parser: its depth, the column and the top-level field."""
    depth = deepest = column = 0
    key = last_string = field = None
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            end = i + 1
            while end < n and text[end] != '"':
                end += 2 if text[end] == "\\" else 1
            if depth == 1:
                last_string = text[i : end + 1]
            i = end
        elif c in "[{":
            depth += 1
            if depth == 2 and text.lstrip().startswith("{"):
                key = last_string
            if depth > deepest:
                deepest, column, field = depth, i + 1, key
        elif c in "]}":
            depth -= 1
        i += 1
    where = f"`{_path('', _decoded(field))}` is" if field else "the row is"
    return f"{where} nested {deepest} levels deep (deepest at column {column}); Python's JSON parser reads about {sys.getrecursionlimit()}"


def _decoded(quoted: str) -> str:
    try:
        return json.loads(quoted)
    except ValueError:
        return quoted.strip('"')


def _find(value: Any, bad: Callable[[Any], bool]) -> tuple[str, Any] | None:
    """The first value (or key) in a parsed row that is `bad`, depth first in document order, with its
    field path (`messages[0].content`). Iterative: a row may nest as deep as the parser allowed."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, v = stack.pop()
        if bad(v):
            return (f"`{path}`" if path else "the row"), v
        if isinstance(v, dict):
            for k in v:
                if bad(k):
                    return (f"a key of `{path}`" if path else "a top-level key"), k
            stack.extend((_path(path, k), child) for k, child in reversed(v.items()))
        elif isinstance(v, list):
            stack.extend((f"{path}[{i}]", child) for i, child in reversed(list(enumerate(v))))
    return None


def _path(path: str, key: str) -> str:
    """`path.key`, or `path["odd key"]` (escaped, so a message stays one printable line)."""
    if key.isidentifier():
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key)}]"


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]


def to_prompt(row: Any, line: int = 0) -> Prompt:
    """Normalize one row to a `Prompt`; an `InputError` names the field that is wrong."""
    if not isinstance(row, dict):
        raise InputError(f"row is a {type(row).__name__}, expected a JSON object")
    id_field = next((k for k in ("id", "question_id", "uid") if k in row), "id")
    row_id = row.get(id_field)
    if "messages" in row:
        messages = check_messages(row["messages"], "messages")
    elif isinstance(row.get("prompt"), str):
        messages = [{"role": "user", "content": check_content(row["prompt"], "prompt")}]
    elif "turns" in row:
        turns = row["turns"]
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], dict):
            raise InputError("`turns` must be a non-empty list of {content} objects")
        messages = [{"role": "user", "content": check_content(turns[0].get("content"), "turns[0].content")}]
    elif "context" in row:
        messages = check_messages(row["context"], "context")
    else:
        raise InputError("row needs `messages` (list of {role, content}), `prompt` (string), `turns` or `context`")
    if row_id is None:
        row_id = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]
    elif not isinstance(row_id, (str, int)) or isinstance(row_id, bool):
        raise InputError(f"`{id_field}` must be a string or integer, got {type(row_id).__name__} {_show(row_id)}")
    elif isinstance(row_id, str) and not row_id.strip():
        raise InputError(f"`{id_field}` must not be empty (leave it out to get a content hash)")
    return Prompt(id=str(row_id), messages=messages, line=line)


def check_messages(messages: Any, field: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise InputError(f"`{field}` must be a non-empty list of {{role, content}} messages")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InputError(f"`{field}[{k}]` must be an object with role and content")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise InputError(f"`{field}[{k}].role` must be one of {sorted(ROLES)}, got {_show(role)}")
        out.append({"role": role, "content": check_content(m.get("content"), f"{field}[{k}].content")})
    if out[-1]["role"] != "user":
        raise InputError(f"`{field}` must end with a user message, got {out[-1]['role']!r}")
    return out


def check_content(content: Any, field: str) -> str:
    if not isinstance(content, str) or not content.strip():
        raise InputError(f"`{field}` must be a non-empty string")
    return content
