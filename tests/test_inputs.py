"""Input reading: every supported shape, and malformed rows reported with their line, never dropped."""

import gzip
import json

import pytest

from conftest import SHARED
from actors.errors import InputError
from engine.inputs import read_prompts


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_plain_messages_arena_hard_and_v2_rows(tmp_path):
    path = write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"id": "a", "prompt": "Hi"},
            {"id": 7, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]},
            {"question_id": "q1", "category": "arena-hard-v0.1", "cluster": "c", "turns": [{"content": "Solve x"}]},
            {"uid": "u1", "category": "hard_prompt", "subcategory": "s", "prompt": "v2 prompt"},
            {"prompt": "no id"},
        ],
    )
    prompts, errors = read_prompts(path)
    assert errors == []
    assert [p.id for p in prompts][:4] == ["a", "7", "q1", "u1"]
    assert prompts[1].messages[0] == {"role": "system", "content": "Be brief."}
    assert prompts[2].messages == [{"role": "user", "content": "Solve x"}]
    assert len(prompts[4].id) == 16  # a content hash: stable across runs
    assert read_prompts(path)[0][4].id == prompts[4].id


def test_real_arena_hard_questions_and_helpsteer3_fixtures():
    prompts, errors = read_prompts(SHARED / "arena-hard-v0.1" / "question.jsonl")
    assert len(prompts) == 500 and errors == []
    prompts, errors = read_prompts(SHARED / "fixtures" / "helpsteer3" / "feedback" / "train.jsonl.gz")
    assert errors == [] and prompts and all(p.messages[-1]["role"] == "user" for p in prompts)


def test_parquet_and_gzip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"id": "p1", "prompt": "Hi"}, {"id": "p2", "prompt": "Yo"}]), tmp_path / "in.parquet")
    prompts, errors = read_prompts(tmp_path / "in.parquet")
    assert [p.id for p in prompts] == ["p1", "p2"] and errors == []
    with gzip.open(tmp_path / "in.jsonl.gz", "wt") as f:
        f.write(json.dumps({"id": "g", "prompt": "zipped"}) + "\n")
    assert read_prompts(tmp_path / "in.jsonl.gz")[0][0].id == "g"


def test_malformed_rows_are_reported_with_line_and_field(tmp_path):
    rows = [
        {"id": "ok1", "prompt": "fine"},
        "{not json",
        ["a", "list"],
        {"id": "x1"},
        {"id": "x2", "messages": [{"role": "robot", "content": "hi"}]},
        {"id": "x3", "messages": [{"role": "user", "content": "  "}]},
        {"id": "x4", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"id": "ok1", "prompt": "again"},
        {"id": {"nested": 1}, "prompt": "p"},
        {"id": "x5", "messages": []},
        {"id": "x6", "turns": []},
        {"id": "ok2", "prompt": "fine too"},
    ]
    prompts, errors = read_prompts(write_jsonl(tmp_path / "in.jsonl", rows))
    assert [p.id for p in prompts] == ["ok1", "ok2"]
    by_line = {e.line: e.error for e in errors}
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert "not valid JSON" in by_line[2]
    assert "expected a JSON object" in by_line[3]
    assert "needs `messages`" in by_line[4]
    assert "`messages[0].role` must be one of" in by_line[5]
    assert "`messages[0].content` must be a non-empty string" in by_line[6]
    assert "must end with a user message" in by_line[7]
    assert "duplicate id 'ok1' (first at line 1)" in by_line[8]
    assert "`id` must be a string or integer" in by_line[9]
    assert "non-empty list" in by_line[10]
    assert "`turns` must be a non-empty list" in by_line[11]
    assert all(e.source.endswith("in.jsonl") for e in errors)


def test_limit_and_missing_file(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p{i}"} for i in range(5)])
    assert len(read_prompts(path, limit=2)[0]) == 2
    with pytest.raises(InputError, match="does not exist"):
        read_prompts(tmp_path / "missing.jsonl")
