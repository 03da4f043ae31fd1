"""`fescale prepare distill-prompts`: the paper's distillation prompts from HelpSteer3 `feedback` (no Ray, no model).

The fixtures' feedback subset, counted by hand: train has 4 rows, one of them a multi-turn
conversation (python, 3 turns), so 3 first-turn prompts, all distinct; validation has 1 first-turn
row that train does not ask. Prepared: 3 train, 1 validation.
"""

import gzip
import json

import pytest

from conftest import SHARED
from actors.errors import ConfigError, InputError
from cli.main import main
from engine.inputs import read_prompts
from train import distill_prompts

FIXTURES = SHARED / "fixtures" / "helpsteer3"
FB = ["The response is mostly helpful. It could improve."]


def row(*turns, domain="general"):
    roles = ["user", "assistant"] * len(turns)
    context = [{"role": r, "content": t} for r, t in zip(roles, turns)] if isinstance(turns[0], str) else turns[0]
    return {"domain": domain, "language": "english", "context": context, "response1": "R1", "response2": "R2", "feedback1": FB, "feedback2": FB}


def write(root, split, lines):
    path = root / "feedback" / f"{split}.jsonl.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines))
    return path


def test_the_fixtures_give_3_train_and_1_validation_prompts_that_distill_reads_back(tmp_path):
    result = distill_prompts.collect(FIXTURES)
    assert result.counts() == "3 train, 1 validation" and result.bad == []
    assert result.rows == {"train": 4, "validation": 1} and result.drops.as_dict() == {"not a first-turn prompt": 1}
    files = distill_prompts.write(result, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train.jsonl", "validation.jsonl"]
    for split, n in (("train", 3), ("validation", 1)):
        prompts, errors = read_prompts(files[split])  # what `fescale distill --input` parses
        assert errors == [] and len(prompts) == n
        assert [(p.id, p.messages) for p in prompts] == [(r["id"], r["messages"]) for r in result.prompts[split]]
    assert read_prompts(files["validation"])[0][0].messages == [{"role": "user", "content": "Suggest a name for a bakery."}]
    assert distill_prompts.collect(FIXTURES).prompts == result.prompts  # same data, same ids


def test_first_turn_unique_and_validation_prompts_asked_in_train_stay_in_train(tmp_path):
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    write(tmp_path, "train", [row("A?"), row("B?"), row("A?"), row("A?", "a", "more?"), row(system)])
    write(tmp_path, "validation", [row("B?"), row("C?"), row("C?")])
    result = distill_prompts.collect(tmp_path)
    assert [p["messages"] for p in result.prompts["train"]] == [[{"role": "user", "content": "A?"}], [{"role": "user", "content": "B?"}], system]
    assert [p["messages"] for p in result.prompts["validation"]] == [[{"role": "user", "content": "C?"}]]
    assert result.drops.as_dict() == {"duplicate prompt in train": 1, "duplicate prompt in validation": 1,
                                      "not a first-turn prompt": 1, "validation prompt also in train": 1}  # fmt: skip
    assert len({p["id"] for split in result.prompts.values() for p in split}) == 4


def test_without_a_validation_file_the_rows_are_split_seeded(tmp_path):
    write(tmp_path, "train", [row(f"Q{i}?") for i in range(40)])
    result = distill_prompts.collect(tmp_path, validation_fraction=0.05, seed=1)
    assert result.counts() == "38 train, 2 validation"
    assert distill_prompts.collect(tmp_path, 0.05, 1).prompts == result.prompts
    assert distill_prompts.collect(tmp_path, 0.05, 2).prompts["validation"] != result.prompts["validation"]


HOSTILE = [
    b"{not json",
    b'{"domain": "general", "context": [{"role": "user", "content": "caf\xe9"}]}',  # latin-1, not UTF-8
    b'{"domain": "general", "context": [{"role": "user", "content": "\\ud800"}], "response1": "R"}',
    b"[" * 100_000 + b"]" * 100_000,
    b'{"domain": "general", "n": 1' + b"0" * 5000 + b"}",
    b"[1, 2]",
    json.dumps({**row("Q?"), "feedback1": []}).encode(),
    json.dumps({**row("Q?"), "domain": "law"}).encode(),
    json.dumps({**row("Q?"), "context": [{"role": "assistant", "content": "I start."}]}).encode(),
]


def test_hostile_rows_are_reported_with_file_and_line_and_the_job_goes_on(tmp_path):
    path = write(tmp_path, "train", [row("Good?"), *HOSTILE, b"   ", row("Also good?")])
    write(tmp_path, "validation", [row("Valid?")])
    result = distill_prompts.collect(tmp_path)
    assert result.counts() == "2 train, 1 validation"
    assert [b.split(": ", 1)[0] for b in result.bad] == [f"{path}:{line}" for line in range(2, 2 + len(HOSTILE))]
    for why in ["not valid JSON", "not valid UTF-8", "not valid Unicode", "nested", "digits", "expected a JSON object",
                "`feedback1` must be a non-empty list", "`domain` must be one of", "must end with a user message"]:  # fmt: skip
        assert sum(why in b for b in result.bad) == 1, why


def test_a_cut_gzip_keeps_the_rows_before_the_cut(tmp_path):
    write(tmp_path, "train", [row("Good?")])
    path = write(tmp_path, "validation", [row(f"Question {i} " + "x" * 2000 + "?") for i in range(200)])
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    result = distill_prompts.collect(tmp_path)
    assert len(result.bad) == 1 and "unreadable from here on" in result.bad[0]
    assert 0 < len(result.prompts["validation"]) < 200 and len(result.prompts["train"]) == 1


def test_a_missing_subset_stops_before_anything_is_written(tmp_path):
    with pytest.raises(InputError, match=r"feedback/train.jsonl.gz does not exist; --data-dir must hold"):
        distill_prompts.collect(tmp_path)


def test_nothing_is_replaced_and_only_its_own_half_written_file_is_removed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "train.jsonl").write_text("a user's file\n")
    result = distill_prompts.collect(FIXTURES)
    with pytest.raises(ConfigError, match="never replaces a file"):
        distill_prompts.write(result, out)
    assert (out / "train.jsonl").read_text() == "a user's file\n" and not (out / "validation.jsonl").exists()
    (out / "train.jsonl").unlink()
    result.prompts["validation"].append({"id": "x", "messages": {"not", "serializable"}})  # fails half way through
    with pytest.raises(TypeError):
        distill_prompts.write(result, out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "train.jsonl"] and (out / "notes.txt").read_text() == "mine"


def test_the_command_prints_counts_reports_bad_rows_and_refuses_an_occupied_output(tmp_path, capsys):
    write(tmp_path, "train", [row("A?"), b"{not json", row("B?")])
    write(tmp_path, "validation", [row("C?")])
    args = ["prepare", "distill-prompts", "--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "out")]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "2 train, 1 validation" in out and "skipped 1 malformed row(s)" in err and "train.jsonl.gz:2: not valid JSON" in err
    assert main(args) == 2
    assert "never replaces a file" in capsys.readouterr().err
    assert len(read_prompts(tmp_path / "out" / "train.jsonl")[0]) == 2


def test_help_explains_the_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["prepare", "distill-prompts", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    for words in ["first-turn prompts", "21,850 train, 794 validation", "fescale distill --input", "--data-dir",
                  "kept in train only", "never replaced", "skipped; the job goes on"]:  # fmt: skip
        assert words in text, words
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    assert "distill-prompts" in capsys.readouterr().out
