"""arena-hard-auto's own file formats, read and written exactly (v0.1 and v2.0).

v0.1 (`data/arena-hard-v0.1/`):
- question  `{question_id, category, cluster, turns: [{content}]}`
- answer    `{question_id, answer_id, model_id, choices: [{index, turns: [{content, token_len}]}], tstamp}`
- judgment  `{question_id, model, judge, games: [{user_prompt, judgment, score}, ...]}`
v2.0 (`data/arena-hard-v2.0/`):
- question  `{uid, category, subcategory, prompt}`
- answer    `{uid, ans_id, model, messages: [..., {role: assistant, content: {answer}}], tstamp, metadata}`
- judgment  `{uid, category, judge, model, baseline, games: [{score, judgment, prompt}, ...]}`

Game 1 of a judgment has the baseline as assistant A, game 2 swaps the positions. fescale adds one
key of its own to answer rows, `fescale` (ITS tokens, latency, mode, config hash); arena-hard-auto
ignores unknown keys, so its scripts read these files unchanged.

Example:
    >>> q = Question.from_row({"question_id": "q1", "category": "arena-hard-v0.1", "cluster": "c", "turns": [{"content": "hi"}]})
    >>> q.to_row() == {"question_id": "q1", "category": "arena-hard-v0.1", "cluster": "c", "turns": [{"content": "hi"}]}
    True
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from actors.errors import InputError

Version = Literal["v0.1", "v2.0"]
_CODE_BLOCK = re.compile("```([^`]*)```")


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) of a JSONL file; a missing file or a line that is not a JSON object is an
    `InputError` naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"not valid JSON: {e}", source=str(path), line=number) from None
            if not isinstance(row, dict):
                raise InputError("a row must be a JSON object", source=str(path), line=number)
            yield number, row


def append_jsonl(path: Path, row: dict) -> None:
    """Append one row and flush it to the OS, so a crash loses at most the row being written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _field(row: dict, key: str, kind: type, where: str) -> Any:
    value = row.get(key)
    if not isinstance(value, kind):
        raise InputError(f"{where}: `{key}` must be a {kind.__name__}, got {type(value).__name__}")
    return value


# -- questions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    id: str
    prompt: str
    category: str
    cluster: str  # v0.1 `cluster`, v2.0 `subcategory`
    version: Version

    @classmethod
    def from_row(cls, row: dict, where: str = "question") -> "Question":
        if "uid" in row:
            return cls(
                id=str(_field(row, "uid", str, where)),
                prompt=_field(row, "prompt", str, where),
                category=_field(row, "category", str, where),
                cluster=str(row.get("subcategory", "")),
                version="v2.0",
            )
        if "question_id" in row:
            turns = row.get("turns")
            if not isinstance(turns, list) or not turns or not isinstance(turns[0], dict) or not isinstance(turns[0].get("content"), str):
                raise InputError(f"{where}: `turns` must be a non-empty list of {{content}} objects")
            return cls(
                id=str(row["question_id"]),
                prompt=turns[0]["content"],
                category=str(row.get("category", "arena-hard-v0.1")),
                cluster=str(row.get("cluster", "")),
                version="v0.1",
            )
        raise InputError(f"{where}: an Arena Hard question needs `question_id` + `turns` (v0.1) or `uid` + `prompt` (v2.0)")

    def to_row(self) -> dict:
        if self.version == "v2.0":
            return {"uid": self.id, "category": self.category, "subcategory": self.cluster, "prompt": self.prompt}
        return {"question_id": self.id, "category": self.category, "cluster": self.cluster, "turns": [{"content": self.prompt}]}


def read_questions(path: str | Path) -> list[Question]:
    """All questions of a `question.jsonl` (one version per file; a mix is an error)."""
    questions = [Question.from_row(row, f"{path}:{n}") for n, row in iter_jsonl(path)]
    versions = {q.version for q in questions}
    if len(versions) > 1:
        raise InputError(f"{path} mixes v0.1 and v2.0 questions; use one file per benchmark version")
    if not questions:
        raise InputError(f"{path} has no questions")
    return questions


# -- answers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ITSCost:
    """What the inference-time-scaling system spent on one answer (every stage, not just the final text)."""

    tokens: int  # prompt + completion tokens of every stage
    generated_tokens: int  # completion tokens of every stage
    latency_s: float  # wall time of this answer's steps, start to selected answer
    mode: str
    config_hash: str


@dataclass(frozen=True)
class Answer:
    question_id: str
    model: str
    text: str
    token_len: int  # tokens of the final answer, counted by a real tokenizer
    version: Version
    prompt: str = ""  # the question, repeated in v2.0 rows as the user message
    answer_id: str = field(default_factory=lambda: uuid.uuid4().hex[:22])
    tstamp: float = field(default_factory=time.time)
    cost: ITSCost | None = None

    def to_row(self) -> dict:
        if self.version == "v2.0":
            row: dict[str, Any] = {
                "uid": self.question_id,
                "ans_id": self.answer_id,
                "model": self.model,
                "messages": [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": {"answer": self.text}}],
                "tstamp": self.tstamp,
                "metadata": {"token_len": self.token_len, **markdown_counts(self.text)},
            }
        else:
            row = {
                "question_id": self.question_id,
                "answer_id": self.answer_id,
                "model_id": self.model,
                "choices": [{"index": 0, "turns": [{"content": self.text, "token_len": self.token_len}]}],
                "tstamp": self.tstamp,
            }
        if self.cost is not None:
            row["fescale"] = {
                "its_tokens": self.cost.tokens,
                "its_generated_tokens": self.cost.generated_tokens,
                "latency_s": round(self.cost.latency_s, 3),
                "mode": self.cost.mode,
                "config_hash": self.cost.config_hash,
            }
        return row

    @classmethod
    def from_row(cls, row: dict, where: str = "answer") -> "Answer":
        extra = row.get("fescale")
        cost = None
        if isinstance(extra, dict):
            cost = ITSCost(extra["its_tokens"], extra["its_generated_tokens"], extra["latency_s"], extra["mode"], extra["config_hash"])
        if "uid" in row:
            messages = _field(row, "messages", list, where)
            content = messages[-1].get("content") if messages and isinstance(messages[-1], dict) else None
            text = content.get("answer") if isinstance(content, dict) else content
            if not isinstance(text, str):
                raise InputError(f"{where}: the last message's content must be {{answer: str}}")
            token_len = (row.get("metadata") or {}).get("token_len", 0)
            first = messages[0] if isinstance(messages[0], dict) and messages[0].get("role") == "user" else {}
            return cls(str(row["uid"]), str(row.get("model", "")), text, int(token_len), "v2.0", str(first.get("content", "")), str(row.get("ans_id", "")), row.get("tstamp", 0.0), cost)
        try:
            turn = row["choices"][0]["turns"][0]
            text = turn["content"]
        except (KeyError, IndexError, TypeError):
            raise InputError(f"{where}: a v0.1 answer needs `choices: [{{index, turns: [{{content, token_len}}]}}]`") from None
        token_len = turn.get("token_len", (row.get("conv_metadata") or {}).get("token_len", 0))
        return cls(_field(row, "question_id", str, where), str(row.get("model_id", "")), text, int(token_len), "v0.1", "", str(row.get("answer_id", "")), row.get("tstamp", 0.0), cost)


def read_answers(path: str | Path) -> dict[str, Answer]:
    """question id -> answer; a later row for the same question wins (as in arena-hard-auto)."""
    answers = {}
    for n, row in iter_jsonl(path):
        answer = Answer.from_row(row, f"{path}:{n}")
        answers[answer.question_id] = answer
    return answers


def markdown_counts(text: str) -> dict[str, dict[str, int]]:
    """arena-hard-auto's style metadata (`utils/add_markdown_info.py`): headers, lists, bold, code removed."""
    for block in _CODE_BLOCK.findall(text):
        text = text.replace(block, "")
    return {
        "header_count": {f"h{i}": len(re.findall(rf"^#{{{i}}}\s", text, re.MULTILINE)) for i in range(1, 7)},
        "list_count": {
            "ordered": len(re.findall(r"^\s*\d+\.\s", text, re.MULTILINE)),
            "unordered": len(re.findall(r"^\s*[-*+]\s", text, re.MULTILINE)),
        },
        "bold_count": {"**": len(re.findall(r"\*\*[^*\n]+\*\*", text)), "__": len(re.findall(r"__[^_\n]+__", text))},
    }


# -- judgments ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Game:
    score: str | None  # the verdict label (A>>B, A>B, A=B, B>A, B>>A) or None: no verdict
    user_prompt: str | None = None
    judgment: str | None = None


@dataclass(frozen=True)
class Judgment:
    question_id: str
    model: str
    judge: str
    games: tuple[Game | None, ...]  # game 1: A = baseline; game 2: positions swapped
    version: Version
    category: str = "arena-hard-v0.1"
    baseline: str | None = None  # v2.0 rows name it; v0.1 rows do not

    @classmethod
    def from_row(cls, row: dict, where: str = "judgment") -> "Judgment":
        games = _field(row, "games", list, where)
        parsed = []
        for g in games:
            if g is None:
                parsed.append(None)
            elif isinstance(g, dict):
                text = g.get("judgment")
                if isinstance(text, dict):  # v2.0 keeps the API output object {answer: ...}
                    text = text.get("answer")
                prompt = g.get("user_prompt")
                if isinstance(g.get("prompt"), list):  # v2.0 keeps the judge's messages
                    prompt = next((m.get("content") for m in g["prompt"] if isinstance(m, dict) and m.get("role") == "user"), None)
                parsed.append(Game(g.get("score"), prompt, text))
            else:
                raise InputError(f"{where}: each game must be an object with `score`, got {type(g).__name__}")
        if "uid" in row:
            return cls(str(row["uid"]), _field(row, "model", str, where), str(row.get("judge", "")), tuple(parsed), "v2.0", str(row.get("category", "")), row.get("baseline"))
        return cls(_field(row, "question_id", str, where), _field(row, "model", str, where), str(row.get("judge", "")), tuple(parsed), "v0.1")

    def to_row(self) -> dict:
        if self.version == "v2.0":
            games = [None if g is None else {"score": g.score, "judgment": {"answer": g.judgment}, "prompt": [{"role": "user", "content": g.user_prompt}]} for g in self.games]
            return {"uid": self.question_id, "category": self.category, "judge": self.judge, "model": self.model, "baseline": self.baseline, "games": games}
        games = [None if g is None else {"user_prompt": g.user_prompt, "judgment": g.judgment, "score": g.score} for g in self.games]
        return {"question_id": self.question_id, "model": self.model, "judge": self.judge, "games": games}


def read_judgments(judgment_dir: str | Path) -> list[Judgment]:
    """Every row of `<judgment_dir>/*.jsonl`, files in sorted order (arena-hard-auto globs them in
    directory order; sorting makes the bootstrap, which resamples rows by position, reproducible)."""
    directory = Path(judgment_dir)
    if not directory.is_dir():
        raise InputError(f"judgment directory {directory} does not exist (expected model_judgment/<judge>/)")
    files = sorted(directory.glob("*.jsonl"))
    if not files:
        raise InputError(f"{directory} has no *.jsonl judgment files")
    return [Judgment.from_row(row, f"{f}:{n}") for f in files for n, row in iter_jsonl(f)]
