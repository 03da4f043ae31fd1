"""The config kit: the four YAML loaders (engine, training, judge, sweep grid) share one error format and
one `--set`, and a hostile file or value is one short, readable ConfigError, never a traceback."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any, Callable

import pytest

from actors.errors import ConfigError
from cli.bench import add_bench_parser, add_sweep_parser
from benchmarks.arena_hard.judge import load_judge_config
from benchmarks.arena_hard.sweep import load_grid
from engine.config import CONFIGS_DIR, load_config
from train.config import load_train_config


@dataclass(frozen=True)
class Kind:
    what: str  # as the error's first line names it
    load: Callable[[Any, list[str]], Any]  # (source, overrides) -> model
    valid: str  # a minimal valid file
    typo: str  # a misspelled key, appended to `valid` ...
    unknown: str  # ... and the error line it gives
    size: str  # a positive integer key, dotted
    get: Callable[[Any], int]  # that key's value in the model
    preset: str


KINDS = [
    Kind("config", load_config, "mode: greedy\n", "generate: {num_respones: 2}\n",
         "unknown key `generate.num_respones`; did you mean `num_responses`?", "generate.max_tokens", lambda c: c.generate.max_tokens, "greedy"),
    Kind("training config", lambda source, overrides: load_train_config(source, None, overrides),
         "stage: edit-sft\nmodel: embedded\noutput_dir: out\ndata: {dir: hs3}\n", "optim: {warmup_step: 5}\n",
         "unknown key `optim.warmup_step`; did you mean `warmup_steps`?", "optim.global_batch_size", lambda c: c.optim.global_batch_size, "edit-sft"),
    Kind("judge config", load_judge_config, "model: my-judge\n", "temprature: 0\n",
         "unknown key `temprature`; did you mean `temperature`?", "max_tokens", lambda c: c.max_tokens, "embedded"),
    Kind("grid", load_grid, "axes: {a: {key: generate.num_responses, values: [2]}}\n", "limt: 3\n",
         "unknown key `limt`; did you mean `limit`?", "limit", lambda g: g.limit, "embedded_smoke"),
]  # fmt: skip
IDS = [k.what for k in KINDS]


def nested(key: str, value: str) -> str:
    """`a.b` and `7` -> the YAML `a:\\n  b: 7\\n`."""
    *sections, last = key.split(".")
    return "".join(f"{'  ' * i}{s}:\n" for i, s in enumerate(sections)) + f"{'  ' * len(sections)}{last}: {value}\n"


def config_error(load: Callable[[], Any], source: str, kind: Kind) -> list[str]:
    """The lines of the ConfigError `load` raises, after checking the one format and that it is short
    and carries no chained traceback."""
    with pytest.raises(ConfigError) as err:
        load()
    e, message = err.value, str(err.value)
    assert type(e) is ConfigError and e.__cause__ is None and (e.__context__ is None or e.__suppress_context__)
    assert len(message) < 1000 and "Traceback" not in message
    lines = message.splitlines()
    assert lines[0] == f"invalid {kind.what} ({source}):"
    assert lines[1:] and all(line.startswith("  ") for line in lines[1:])
    return [line.strip() for line in lines[1:]]


@pytest.mark.parametrize("kind", KINDS, ids=IDS)
def test_a_typo_gives_the_same_error_from_every_loader(kind, tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(kind.valid + kind.typo)
    assert config_error(lambda: kind.load(path, []), str(path), kind) == [kind.unknown]


@pytest.mark.parametrize("kind", KINDS, ids=IDS)
def test_set_overrides_work_for_every_loader(kind, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(kind.valid)
    assert kind.get(kind.load(path, [f"{kind.size}=7"])) == 7
    assert kind.get(kind.load(kind.preset, [f"{kind.size}=9", f"{kind.size}=3"])) == 3  # a preset by name; the last one wins


@pytest.mark.parametrize("kind", KINDS, ids=IDS)
@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("{size}", "override '{size}' is not KEY=VALUE"),
        ("={size}", "is not KEY=VALUE"),
        ("{size}=5 {size}.deeper=1", "override '{size}.deeper=1': `{size}` is not a section"),
        ("{size}=[1", "override '{size}=[1': the value is not valid YAML: expected ',' or ']'"),
        ("{size}=" + "9" * 5000, "the value is not valid YAML: Exceeds the limit (4300 digits) for integer string conversion"),
        ("{size}=" + "9" * 4000, "`{size}`: integer too large (more than 64 bits) (got 9999"),
        ("{size}=0", "`{size}`: Input should be greater than 0 (got 0)"),
        ("{size}=-3", "`{size}`: Input should be greater than 0 (got -3)"),
        ("{size}=lots", "`{size}`: Input should be a valid integer, unable to parse string as an integer (got 'lots')"),
    ],
    ids=["no-equals", "no-key", "not-a-section", "bad-yaml", "5000-digits", "4000-digits", "zero", "negative", "wrong-type"],
)
def test_a_bad_override_is_one_readable_error(kind, override, needle, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(kind.valid)
    (problem,) = config_error(lambda: kind.load(path, override.format(size=kind.size).split(" ")), str(path), kind)
    assert needle.format(size=kind.size) in problem


def test_a_10000_deep_override_value_is_one_readable_error():
    """(PyYAML takes seconds to reach its recursion limit: one loader is enough, the kit is shared.)"""
    (problem,) = config_error(lambda: load_config("greedy", ["seed=" + "[" * 10_000 + "]" * 10_000]), str(CONFIGS_DIR / "greedy.yaml"), KINDS[0])
    assert problem.startswith("override 'seed=[[[[") and problem.endswith("[...: the value is not valid YAML: nested too deeply")  # the value cut short


HOSTILE = {
    "invalid-utf8": (lambda kind: kind.valid.encode() + b"name: \xff\xfe\n", "not UTF-8 text: byte 0xff at offset"),
    "deep-nesting": (lambda kind: kind.valid + "deep: " + "[" * 10_000 + "]" * 10_000 + "\n", "not valid YAML: nested too deeply"),
    "5000-digits": (lambda kind: kind.valid + nested(kind.size, "9" * 5000), "value has 5000 digits"),
    "4000-digits": (lambda kind: kind.valid + nested(kind.size, "9" * 4000), "`{size}`: integer too large (more than 64 bits)"),
    "empty-file": (lambda kind: "", "the file is empty (write `{{}}` for all defaults)"),
    "not-a-mapping": (lambda kind: "- a\n- b\n", "the top level must be a mapping of keys, not a list"),
    "bad-yaml": (lambda kind: kind.valid + "oops: [unclosed\n", "not valid YAML: expected ',' or ']'"),
    "wrong-type": (lambda kind: kind.valid + nested(kind.size, "{a: [1]}"), "`{size}`: Input should be a valid integer"),
    "zero": (lambda kind: kind.valid + nested(kind.size, "0"), "`{size}`: Input should be greater than 0 (got 0)"),
    "negative": (lambda kind: kind.valid + nested(kind.size, "-1"), "`{size}`: Input should be greater than 0 (got -1)"),
    "huge-string": (lambda kind: kind.valid + nested(kind.size, "x" * 100_000), "(got 'xxxxxxxx"),
}


@pytest.mark.parametrize("kind", KINDS, ids=IDS)
@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_file_is_one_readable_error(kind, case, tmp_path):
    content, needle = HOSTILE[case]
    path = tmp_path / "hostile.yaml"
    data = content(kind)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    problems = config_error(lambda: kind.load(path, []), str(path), kind)
    assert any(needle.format(size=kind.size) in p for p in problems), problems


@pytest.mark.parametrize("kind", KINDS, ids=IDS)
def test_an_unknown_name_lists_the_presets(kind):
    (problem,) = config_error(lambda: kind.load("no-such-config", []), "no-such-config", kind)
    assert problem.startswith("does not exist: neither a file nor a preset; presets: ") and kind.preset in problem


@pytest.mark.parametrize(
    ("load", "unknown"),
    [
        (lambda: load_config(None, ["roles.editor.modle=x"]), "unknown key `roles.editor.modle`; did you mean `model`?"),
        (lambda: load_config(None, ["feedback.plan=[{count: 1, temprature: 0.5}]"]), "unknown key `feedback.plan.0.temprature`; did you mean `temperature`?"),
        (lambda: load_judge_config(None, ["endpoint.timeout=3"]), "unknown key `endpoint.timeout`; did you mean `timeout_s`?"),
        (lambda: load_grid("embedded_smoke", ["axes.best_of_n.kye=x"]), "unknown key `axes.best_of_n.kye`; did you mean `key`?"),
        (lambda: load_train_config("edit-rloo", None, ["rloo.rollout.zzz=1"]), "unknown key `rloo.rollout.zzz`; valid keys: model, backend,"),
    ],
    ids=["optional-section", "list-item", "judge-endpoint", "dict-of-axes", "no-close-match"],
)
def test_unknown_keys_in_nested_sections_get_a_suggestion(load, unknown):
    with pytest.raises(ConfigError) as err:
        load()
    assert unknown in str(err.value)


def test_overrides_never_change_the_callers_mapping():
    inline = {"model": "j", "endpoint": {"base_url": "http://x"}}
    assert load_judge_config(inline, ["endpoint.max_retries=0"]).endpoint.max_retries == 0
    assert inline == {"model": "j", "endpoint": {"base_url": "http://x"}}


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    add_bench_parser(sub)
    add_sweep_parser(sub)
    return parser.parse_args(argv)


def test_judge_and_sweep_commands_take_overrides(tmp_path):
    judge = ["bench", "arena-hard", "judge", "--questions", "q", "--answers", "a", "--baseline-answers", "b", "--out", str(tmp_path), "--judge-config", "embedded"]
    args = parse(*judge, "--judge-set", "max_tokens=7", "--judge-set", "name=tiny")
    cfg = load_judge_config(args.judge_config, args.judge_set)
    assert (cfg.max_tokens, cfg.judge_name, cfg.backend) == (7, "tiny", "hf")
    bad = parse(*judge, "--judge-set", "max_token=7")
    with pytest.raises(ConfigError, match="unknown key `max_token`; did you mean `max_tokens`"):
        bad.func(bad)

    (tmp_path / "sweep.json").write_text(json.dumps({"name": "x", "points": []}))
    sweep = ["sweep", "--grid", "embedded_smoke", "--out", str(tmp_path), "--pick-for-budget", "100"]
    args = parse(*sweep, "--set", "limit=3", "--set", "name=renamed")
    assert (load_grid(args.grid, args.set).limit, load_grid(args.grid, args.set).name) == (3, "renamed")
    assert args.func(args) == 0
    bad = parse(*sweep, "--set", "limit=0")
    with pytest.raises(ConfigError, match=r"(?s)invalid grid \(.*embedded_smoke.yaml\):.*`limit`: Input should be greater than 0"):
        bad.func(bad)
