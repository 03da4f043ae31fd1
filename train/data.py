"""HelpSteer3 as published: `<dir>/<subset>/{train,validation}.jsonl.gz`, read from a local folder.

Every row is checked against its subset's schema (../shared/method.md, "HelpSteer3 schema") before
any preparation: a missing field, a wrong type or an empty feedback list is an `InputError` naming
the file, the line and the field. All bad rows of a file are reported together, and nothing is
trained until they are fixed: a training set that silently lost rows would be a different set.
The distillation data written by `fescale distill` (`sft/part-*.jsonl`, `{id, messages}`) is read
by the same code as a fifth "subset".
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any, Literal

from actors.errors import InputError
from engine.inputs import check_messages, read_rows

Subset = Literal["preference", "feedback", "edit", "edit_quality"]
SPLITS = ("train", "validation")
DOMAINS = ("general", "stem", "code", "multilingual")

# field -> what it must be; "feedback" lists are non-empty lists of non-empty strings
_STR, _FEEDBACK, _INT = "a non-empty string", "a non-empty list of feedback strings", "an integer"
SCHEMAS: dict[str, dict[str, str]] = {
    "preference": {"response1": _STR, "response2": _STR, "overall_preference": _INT},
    "feedback": {"response1": _STR, "response2": _STR, "feedback1": _FEEDBACK, "feedback2": _FEEDBACK},
    "edit": {"original_response": _STR, "edited_response": _STR, "feedback": _FEEDBACK, "change_summary": _STR},
    "edit_quality": {"original_response": _STR, "good_edited_response": _STR, "bad_edited_response": _STR, "feedback": _FEEDBACK},
}
MAX_REPORTED = 20  # bad rows listed in one error; the count covers all of them


def subset_files(root: str | Path, subset: str, key: str = "`data.dir`") -> dict[str, Path]:
    """The split files a subset has under `root` (validation is optional: it is split off when absent);
    `key` is where the user set `root`, named in the error."""
    folder = Path(root) / subset
    files = {split: folder / f"{split}.jsonl.gz" for split in SPLITS}
    if not files["train"].is_file():
        raise InputError(
            f"HelpSteer3 subset {subset!r}: {files['train']} does not exist; {key} must hold "
            f"<subset>/train.jsonl.gz (and optionally validation.jsonl.gz) as published"
        )
    return {split: path for split, path in files.items() if path.is_file()}


def load_subset(root: str | Path, subset: Subset) -> dict[str, list[dict]]:
    """{split: rows} of one HelpSteer3 subset, every row checked; `_line` and `_source` added."""
    return {split: read_checked(path, lambda row: check_row(row, subset)) for split, path in subset_files(root, subset).items()}


def load_distill(sft_dir: str | Path) -> list[dict]:
    """The `{id, messages}` rows `fescale distill` wrote (a folder of parts, or one .sft.jsonl file)."""
    path = Path(sft_dir)
    files = [path] if path.is_file() else sorted(Path(p) for p in glob.glob(str(path / "sft" / "part-*.jsonl")) + glob.glob(str(path / "part-*.jsonl")))
    if not files:
        raise InputError(f"no distillation data at {path}: expected a `fescale distill` output folder (sft/part-*.jsonl) or an .sft.jsonl file")
    return [row for f in files for row in read_checked(f, check_sft_row)]


def read_checked(path: Path, check) -> list[dict]:
    """Every row of `path` checked; any bad row stops the run (a training set must not silently shrink)."""
    rows, bad = check_file(path, check)
    if bad:
        raise InputError(f"{len(bad)} malformed row(s) in {path}; fix or remove them:\n  {listing(bad)}")
    return rows


def check_file(path: Path, check) -> tuple[list[dict], list[str]]:
    """(checked rows with `_source` and `_line`, one `FILE:LINE: why` per bad row): the caller decides
    whether a bad row stops it (training) or is reported and skipped (`train.distill_prompts`)."""
    rows, bad = [], []
    for line, row in read_rows(path):
        try:
            if isinstance(row, InputError):
                raise row
            rows.append({**check(row), "_source": str(path), "_line": line})
        except InputError as e:
            bad.append(f"{path}:{line}: {e}")
    return rows, bad


def listing(bad: list[str]) -> str:
    """The first `MAX_REPORTED` bad rows, one per line, and how many more there are."""
    more = f"\n  ... and {len(bad) - MAX_REPORTED} more" if len(bad) > MAX_REPORTED else ""
    return "\n  ".join(bad[:MAX_REPORTED]) + more


def check_row(row: Any, subset: str) -> dict:
    if not isinstance(row, dict):
        raise InputError(f"row is a {type(row).__name__}, expected a JSON object")
    out = {"domain": _domain(row), "context": _context(row)}
    for field, kind in SCHEMAS[subset].items():
        if field not in row:
            raise InputError(f"missing field `{field}` ({kind}) for subset {subset!r}")
        value = row[field]
        if kind == _INT:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind == _STR:
            ok = isinstance(value, str) and bool(value.strip())
        else:
            ok = isinstance(value, list) and bool(value) and all(isinstance(f, str) and f.strip() for f in value)
        if not ok:
            raise InputError(f"field `{field}` must be {kind}, got {_show(value)}")
        out[field] = value
    return out


def check_sft_row(row: Any) -> dict:
    if not isinstance(row, dict) or "messages" not in row:
        raise InputError("missing field `messages` (the conversation ending with the answer)")
    messages = row["messages"]
    if not isinstance(messages, list) or len(messages) < 2 or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
        raise InputError("field `messages` must be a conversation ending with an assistant turn")
    context = check_messages(messages[:-1], "messages")
    answer = messages[-1].get("content")
    if not isinstance(answer, str) or not answer.strip():
        raise InputError(f"field `messages[{len(messages) - 1}].content` must be a non-empty string")
    return {"id": str(row.get("id", "")), "context": context, "response": answer}


def _domain(row: dict) -> str:
    domain = row.get("domain")
    if domain not in DOMAINS:
        raise InputError(f"field `domain` must be one of {list(DOMAINS)}, got {_show(domain)}")
    return domain


def _context(row: dict) -> list[dict]:
    if "context" not in row:
        raise InputError("missing field `context` (a list of {role, content} turns ending with a user turn)")
    return check_messages(row["context"], "context")


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"
