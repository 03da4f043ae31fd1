"""`fescale score` for real: a tiny Llama read by token_logit on a real Ray pool, hostile rows included.

The command runs as a user runs it (a subprocess with its own local Ray cluster) on JSONL in and
Parquet out; `score_file` runs in-process on the session's cluster for Parquet in and JSONL out.
Every good row's score must equal the model card's reading computed here without fescale, every
bad row must land in the errors file with its id (or FILE:LINE) and one line saying why.
"""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_config
from test_cli import fescale
from test_token_logit import reference

Q = [{"role": "user", "content": "What is the capital of France?"}]
HOSTILE = [
    b'{"id": "a", "messages": [{"role": "user", "content": "What is the capital of France?"}], "response": "Paris."}',
    b'{"id": 7, "prompt": "Name a color.", "response": "Blue, like the sky."}',
    b'{"id": "utf8", "prompt": "bad \xff byte", "response": "x"}',
    b'{"id": "surrogate", "prompt": "hi", "response": "\\ud800"}',
    b'{"id": 1' + b"0" * 5000 + b', "prompt": "hi", "response": "x"}',
    b'{"id": "deep", "prompt": ' + b"[" * 100000 + b"]" * 100000 + b', "response": "x"}',
    b'{"id": "types", "messages": "hello", "response": "x"}',
    b'{"id": "missing", "prompt": "hi"}',
    b'{"id": "empty", "prompt": "hi", "response": "   "}',
    b'{"id": "list", "prompt": "hi", "response": ["x"]}',
    b"not json at all",
    b"",
    b'{"id": "a", "prompt": "again", "response": "dup"}',
    b'{"id": "long", "prompt": "hi", "response": "' + b"word " * 700 + b'"}',
    b'{"prompt": "Say hi.", "response": "Hi!"}',
]
GOOD = {"a": Q + [{"role": "assistant", "content": "Paris."}],
        "7": [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue, like the sky."}]}  # fmt: skip
BAD = {  # id (a line number: a row whose id cannot be read is FILE:LINE) -> a phrase of its reason
    3: "not valid UTF-8", 4: "`response` is not valid Unicode", 5: "`id` is an integer of 5001 digits", 6: "levels deep",
    "types": "`messages` must be a non-empty list", "missing": "row needs `response`", "empty": "`response` must be a non-empty string",
    "list": "`response` must be a non-empty string", 11: "not valid JSON", 13: "duplicate id 'a'", "long": "context is 512",
}  # fmt: skip


def check(rows: list[dict], errors: list[dict], model: str, source: str) -> None:
    by_id = {r["id"]: r["score"] for r in rows}
    assert set(GOOD) < set(by_id) and len(by_id) == len(rows) == 3  # a, 7 and the id-less row (a content hash)
    for row_id, conversation in GOOD.items():
        assert by_id[row_id] == pytest.approx(reference(model, conversation), abs=1e-4)
    reasons = {e["id"]: e["error"] for e in errors}
    for key, phrase in BAD.items():
        row_id = f"{source}:{key}" if isinstance(key, int) else key
        assert phrase in reasons[row_id], (row_id, reasons.get(row_id))
    assert len(errors) == len(BAD) and all("\n" not in e["error"] and e["line"] >= 1 for e in errors)


def test_score_command_jsonl_in_parquet_out(tiny_model, tmp_path):
    source = tmp_path / "answers.jsonl"
    source.write_bytes(b"\n".join(HOSTILE) + b"\n")
    config = tmp_path / "score.yaml"
    config.write_text(json.dumps({"mode": "greedy", "roles": {"generator": {"model": tiny_model, "num_cpus": 1, "threads": 1}}, "select": {"scorer": "token_logit"}}))
    out = fescale("score", "--config", str(config), "--input", str(source), "--output", str(tmp_path / "scores.parquet"), "--quiet")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "scored 3 rows" in out.stdout and "10 unreadable and 1 unscorable" in out.stdout
    rows = pq.read_table(tmp_path / "scores.parquet").to_pylist()
    errors = [json.loads(line) for line in open(tmp_path / "scores.errors.jsonl", encoding="utf-8")]
    check(rows, errors, tiny_model, str(source))
    assert [r["id"] for r in rows][:2] == ["a", "7"]  # input order


def test_score_file_parquet_in_jsonl_out(ray_session, tiny_model, tmp_path):
    from engine.score_job import score_file

    lone_surrogate = "bad \ud800".encode("utf-8", "surrogatepass")  # Arrow stores it; Python cannot decode it
    table = pa.table({
        "id": ["a", "7", "broken", None, "empty"],
        "messages": [Q, [GOOD["7"][0]], Q, [{"role": "user", "content": "Say hi."}], Q],
        "response": pa.array([b"Paris.", b"Blue, like the sky.", lone_surrogate, b"Hi!", b""], pa.binary()).view(pa.string()),
    })  # fmt: skip
    pq.write_table(table, tmp_path / "answers.parquet", row_group_size=2)
    cfg = make_config(tiny_model, mode="best_of_n", select={"scorer": "token_logit"})
    counts = score_file(cfg, tmp_path / "answers.parquet", tmp_path / "scores.jsonl", progress=False)
    assert (counts.scored, counts.input_errors, counts.failed) == (3, 2, 0)
    rows = [json.loads(line) for line in open(tmp_path / "scores.jsonl")]
    assert [r["id"] for r in rows[:2]] == ["a", "7"]
    for row_id in ("a", "7"):
        assert rows[[r["id"] for r in rows].index(row_id)]["score"] == pytest.approx(reference(tiny_model, GOOD[row_id]), abs=1e-4)
    errors = [json.loads(line) for line in open(tmp_path / "scores.errors.jsonl")]
    assert [(e["id"], e["line"]) for e in errors] == [(f"{tmp_path / 'answers.parquet'}:3", 3), ("empty", 5)]
    assert "`response` is not valid UTF-8" in errors[0]["error"] and "`response` must be a non-empty string" in errors[1]["error"]


def test_score_help_and_refusals(tmp_path):
    out = fescale("score", "--help")
    assert out.returncode == 0
    for phrase in ["token_logit", "raw", "select.token_id", "--input", "--output", "errors.jsonl", "{id, score}", ".parquet"]:
        assert phrase in out.stdout, phrase
    assert "score" in fescale("--help").stdout
    out = fescale("score", "--input", "x.jsonl", "--output", str(tmp_path / "scores.csv"))
    assert out.returncode == 2 and "use .jsonl or .parquet" in out.stderr and "Traceback" not in out.stderr
    out = fescale("score", "--set", "select.scorer=generative", "--input", "x.jsonl", "--output", str(tmp_path / "s.jsonl"))
    assert out.returncode == 2 and "no score for one response" in out.stderr
