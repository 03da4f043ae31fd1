"""Read prompts: JSONL (plain, Arena-Hard, HelpSteer3; optionally .gz) and Parquet.

Each row becomes `(id, messages)`. Accepted row shapes, checked in this order:
- `messages`: a list of `{role, content}` ending with a user turn (`id` optional);
- `prompt`: a string, sent as one user turn (`id` optional);
- Arena-Hard v0.1 `question_id` + `turns: [{content}]` (the first turn), or v2.0 `uid` + `prompt`;
- HelpSteer3 `context` (its list of turns).
Rows without an id get a content hash, so reruns and resumes see the same ids. A malformed row is
never silently dropped: it is returned as an error with its line number and the job goes on.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from actors.errors import InputError

DEMO_PROMPTS = Path(__file__).resolve().parent / "data" / "prompts.jsonl"  # the bundled prompts `fescale run` answers

ROLES = {"system", "user", "assistant"}


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
    """All valid prompts of a file (up to `limit`) and one error per malformed row."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"input file {path} does not exist")
    prompts: list[Prompt] = []
    errors: list[InputErrorRow] = []
    first_line: dict[str, int] = {}
    for line, row in read_rows(path):
        if limit is not None and len(prompts) >= limit:
            break
        try:
            if isinstance(row, InputError):
                raise row
            prompt = to_prompt(row, line)
            if prompt.id in first_line:
                raise InputError(f"duplicate id {prompt.id!r} (first at line {first_line[prompt.id]})")
        except InputError as e:
            errors.append(InputErrorRow(str(path), line, str(e)))
            continue
        first_line[prompt.id] = line
        prompts.append(prompt)
    return prompts, errors


def read_rows(path: Path) -> Iterator[tuple[int, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield i, row
        return
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for i, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                yield i, json.loads(text)
            except json.JSONDecodeError as e:
                yield i, InputError(f"not valid JSON ({e.msg} at column {e.colno})")


def to_prompt(row: Any, line: int = 0) -> Prompt:
    """Normalize one row to a `Prompt`; an `InputError` names the field that is wrong."""
    if not isinstance(row, dict):
        raise InputError(f"row is a {type(row).__name__}, expected a JSON object")
    row_id = row.get("id", row.get("question_id", row.get("uid")))
    if "messages" in row:
        messages = check_messages(row["messages"], "messages")
    elif isinstance(row.get("prompt"), str):
        messages = check_messages([{"role": "user", "content": row["prompt"]}], "prompt")
    elif "turns" in row:
        turns = row["turns"]
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], dict):
            raise InputError("`turns` must be a non-empty list of {content} objects")
        messages = check_messages([{"role": "user", "content": turns[0].get("content")}], "turns[0].content")
    elif "context" in row:
        messages = check_messages(row["context"], "context")
    else:
        raise InputError("row needs `messages` (list of {role, content}), `prompt` (string), `turns` or `context`")
    if row_id is None:
        row_id = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]
    elif not isinstance(row_id, (str, int)) or isinstance(row_id, bool):
        raise InputError(f"`id` must be a string or integer, got {type(row_id).__name__}")
    return Prompt(id=str(row_id), messages=messages, line=line)


def check_messages(messages: Any, field: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise InputError(f"`{field}` must be a non-empty list of {{role, content}} messages")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InputError(f"`{field}[{k}]` must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise InputError(f"`{field}[{k}].role` must be one of {sorted(ROLES)}, got {role!r}")
        if not isinstance(content, str) or not content.strip():
            raise InputError(f"`{field}[{k}].content` must be a non-empty string")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "user":
        raise InputError(f"`{field}` must end with a user message, got {out[-1]['role']!r}")
    return out
