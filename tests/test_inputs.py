"""Input reading: every supported shape, and malformed rows reported with their line, never dropped."""

import gzip
import json

import pytest

from conftest import SHARED
from actors.errors import InputError
from engine.inputs import InputErrorRow, parse_line, read_prompts


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


# -- hostile lines: what Python cannot read or write back is that line's error, and only that line's --

GOOD = b'{"id": "before", "prompt": "fine"}\n'
AFTER = b'{"id": "after", "prompt": "fine too"}\n'
DEEP = b"[" * 10_000 + b"]" * 10_000
HUGE = b"1" * 5000


@pytest.mark.parametrize(
    "line, expected",
    [
        (b'{"id": "x", "prompt": "caf\xc3 au lait"}', "not valid UTF-8 (invalid continuation byte: byte 0xc3 at column 27)"),
        (b'{"id": "x", "prompt": "bad \xff"}', "not valid UTF-8 (invalid start byte: byte 0xff at column 28)"),
        (b'{"id": "x", "prompt": "hi \\ud800 there"}', "`prompt` is not valid Unicode (lone surrogate at position 3)"),
        (b'{"id": "x", "messages": [{"role": "user", "content": "hi \\ud800 there"}]}', "`messages[0].content` is not valid Unicode (lone surrogate at position 3)"),
        (b'{"id": "x", "context": [{"role": "user", "content": "\\uDFFF"}]}', "`context[0].content` is not valid Unicode (lone surrogate at position 0)"),
        (b'{"id": "ab\\udc00", "prompt": "hi"}', "`id` is not valid Unicode (lone surrogate at position 2)"),
        (b'{"id": "x", "prompt": "hi", "meta": {"odd key": "\\ud800"}}', '`meta["odd key"]` is not valid Unicode'),
        (b'{"id": "x", "prompt": "hi", "\\ud800": 1}', "a top-level key is not valid Unicode"),
        (b'{"id": ' + HUGE + b', "prompt": "hi"}', "`id` is an integer of 5000 digits; Python reads at most 4300"),
        (b'{"id": "x", "prompt": "hi", "meta": {"n": [1, -' + HUGE + b"]}}", "`meta.n[1]` is an integer of 5000 digits"),
        (b'{"id": "x", "messages": [{"role": "user", "content": ' + HUGE + b"}]}", "`messages[0].content` is an integer of 5000 digits"),
        (b'{"id": "x", "prompt": "hi", "deep": ' + DEEP + b"}", "`deep` is nested 10001 levels deep (deepest at column 10036)"),
        (DEEP, "the row is nested 10000 levels deep"),
        (b'{"id": true, "prompt": "hi"}', "`id` must be a string or integer, got bool True"),
        (b'{"id": 1.5, "prompt": "hi"}', "`id` must be a string or integer, got float 1.5"),
        (b'{"id": {"k": [1]}, "prompt": "hi"}', "`id` must be a string or integer, got dict"),
        (b'{"question_id": [], "turns": [{"content": "q"}]}', "`question_id` must be a string or integer, got list"),
        (b'{"id": " ", "prompt": "hi"}', "`id` must not be empty"),
        (b'{"id": "x", "messages": [{"role": {"r": 1}, "content": "q"}]}', "`messages[0].role` must be one of"),
        (b'{"id": "x", "prompt": " "}', "`prompt` must be a non-empty string"),
        (b'{"id": "x", "turns": [{"content": 3}]}', "`turns[0].content` must be a non-empty string"),
    ],
)
def test_a_hostile_line_is_one_error_row_and_its_neighbours_survive(tmp_path, line, expected):
    path = tmp_path / "in.jsonl"
    path.write_bytes(GOOD + line + b"\n" + AFTER)
    prompts, errors = read_prompts(path)
    assert [p.id for p in prompts] == ["before", "after"] and [p.line for p in prompts] == [1, 3]
    [error] = errors
    assert error.line == 2 and expected in error.error and "\n" not in error.error
    json.dumps(error.to_json()).encode()  # the errors file can be written
    assert parse_line(line, 2, "in.jsonl") == InputErrorRow("in.jsonl", 2, error.error)  # the same, from raw bytes


def test_ids_blank_lines_bom_crlf_and_an_empty_file(tmp_path):
    big = "9" * 4000  # under Python's digit limit: a valid integer id, kept as its decimal string
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"id": 7, "prompt": "a"}\r\n   \t\n\n{"id": ' + big.encode() + b', "prompt": "b"}\r\n{"prompt": "\\ud83d\\ude00"}')
    prompts, errors = read_prompts(path)
    assert errors == [] and [p.line for p in prompts] == [1, 4, 5]
    assert prompts[0].id == "7" and prompts[1].id == big and prompts[2].messages[0]["content"] == "\U0001F600"  # a valid pair
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert read_prompts(tmp_path / "empty.jsonl") == ([], [])
    assert parse_line(b"  \r\n", 3, "x") is None and parse_line(b"\xef\xbb\xbf\n", 1, "x") is None
    for raw in (b"\x00", "\ud800".encode("utf-8", "surrogatepass"), b"{" * 5, bytes(range(256)), b"\xef\xbb\xbf\xef\xbb\xbf{}"):
        assert isinstance(parse_line(raw, 9, "x"), InputErrorRow)  # total: any bytes give a row or an error, never a raise


def test_gzip_keeps_line_numbers_and_a_cut_stream_ends_in_one_error(tmp_path):
    body = GOOD + b"\n" + b'{"prompt": "\xfe"}\n' + AFTER
    path = tmp_path / "in.jsonl.gz"
    path.write_bytes(gzip.compress(body))
    prompts, errors = read_prompts(path)
    assert [(p.id, p.line) for p in prompts] == [("before", 1), ("after", 4)]
    assert [(e.line, e.error[:18]) for e in errors] == [(3, "not valid UTF-8 (i")]
    lines = b"".join(b'{"id": "p%d", "prompt": "x"}\n' % i for i in range(2000))
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(lines)[:-200])
    prompts, errors = read_prompts(cut)
    [error] = errors
    assert error.line == len(prompts) + 1 and "file unreadable from here on (EOFError" in error.error
    (tmp_path / "not.jsonl.gz").write_bytes(b'{"prompt": "plain"}\n')
    with pytest.raises(InputError, match="cannot be read as gzipped JSONL: BadGzipFile"):
        read_prompts(tmp_path / "not.jsonl.gz")


def test_parquet_rows_arrow_cannot_convert_fail_alone(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    lone_surrogate = "bad \ud800".encode("utf-8", "surrogatepass")  # Arrow stores it; Python cannot decode it
    table = pa.table({
        "id": ["a", "b", "c", "d", "e"],
        "prompt": pa.array([b"fine", lone_surrogate, b"fine", b"fine", b"fine"], pa.binary()).view(pa.string()),
        "seen": pa.array([0, 0, 2**62, 0, 0], pa.int64()).cast(pa.timestamp("us")),  # past year 9999
        "n": pa.array([1, 1, 1, 2**64 - 1, 1], pa.uint64()),
        "qid": pa.array([None, None, None, None, None], pa.string()),
    })
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=2)
    prompts, errors = read_prompts(tmp_path / "in.parquet")
    assert [(p.id, p.line) for p in prompts] == [("a", 1), ("d", 4), ("e", 5)]
    assert [(e.line, e.error) for e in errors] == [
        (2, "`prompt` is not valid UTF-8 (invalid continuation byte at byte 4)"),
        (3, "`seen` cannot be read: OverflowError: date value out of range"),
    ]
    pq.write_table(pa.table({"id": [1.5, 2.0], "prompt": ["x", "y"]}), tmp_path / "floats.parquet")
    assert [e.error for e in read_prompts(tmp_path / "floats.parquet")[1]][0].startswith("`id` must be a string or integer, got float")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match="cannot be read as Parquet: ArrowInvalid"):
        read_prompts(tmp_path / "junk.parquet")
