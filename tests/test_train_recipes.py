"""The stage registry and the generic runner: every stage is a recipe, and the runner names none (no Ray)."""

import ast
import json
from pathlib import Path

import pytest
from pydantic import BaseModel

import train.runner
from conftest import SHARED
from actors.errors import ConfigError
from train.config import STAGES, TrainConfig, load_train_config
from train.runner import train as run_training
from train.stages import RECIPES

FIXTURES = SHARED / "fixtures" / "helpsteer3"


def test_every_stage_has_a_recipe_and_every_recipe_is_a_stage():
    assert sorted(RECIPES) == sorted(STAGES)
    assert all(recipe.name == name for name, recipe in RECIPES.items())


@pytest.mark.parametrize("stage", STAGES)
def test_a_recipes_batch_key_is_a_config_key_and_sets_its_step(stage):
    recipe = RECIPES[stage]
    model: type[BaseModel] = TrainConfig
    *parents, leaf = recipe.batch_key.split(".")
    for name in parents:
        model = model.model_fields[name].annotation
    assert leaf in model.model_fields, f"{stage}: {recipe.batch_key} is not a TrainConfig key"
    cfg = load_train_config(stage, stage, [f"{recipe.batch_key}=7"])
    assert recipe.items_per_step(cfg) == 7
    assert recipe.task.mode in ("min", "max") and recipe.task.metric.startswith("val_")


def test_the_runner_has_no_per_stage_branch():
    tree = ast.parse(Path(train.runner.__file__).read_text())
    literals = [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and node.value in STAGES]
    assert literals == [], f"train/runner.py names stages {literals}; a stage's differences belong in its recipe"
    compared = [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Compare) and "stage" in ast.unparse(node)]
    assert compared == []


def test_only_rloo_runs_something_beside_the_workers():
    for stage, recipe in RECIPES.items():
        cfg = load_train_config(stage, stage, ["rloo.rollout.num_cpus=2", "rloo.rollout.replicas=3"])
        assert recipe.reserved_cpus(cfg) == (6 if stage == "edit-rloo" else 0)
        if stage != "edit-rloo":
            with recipe.extras(cfg) as extras:
                assert extras == {}


@pytest.mark.parametrize("labels", [0, 2, 3])
def test_rloo_refuses_a_reward_model_without_one_score_per_sequence(embedded_dir, tmp_path, labels):
    """A causal LM has no scalar head (transformers gives it 2 fresh outputs): refused up front, not
    as a tensor shape error in the first step on a training worker."""
    rm = scalar_head(embedded_dir, tmp_path / "rm", labels)
    cfg = load_train_config("edit-rloo", "edit-rloo", [f"data.dir={FIXTURES}", f"model={embedded_dir}", f"output_dir={tmp_path}", f"rloo.reward_model={rm}"])
    with pytest.raises(ConfigError, match=rf"rloo.reward_model=.* has {labels} outputs per sequence; RLOO needs a reward model with one"):
        run_training(cfg, dry_run=True)


def test_rm_epochs_count_the_steps_of_distinct_tuples():
    cfg = load_train_config("edit-rm", "edit-rm", ["rm.tuples_per_step=4"])
    items = [{"id": i, "key": f"k{i % 5}"} for i in range(10)]  # 5 tuples, 2 edits each: 2 steps, not 10 // 4
    assert RECIPES["edit-rm"].steps_per_epoch(cfg, items) == 2
    assert RECIPES["edit-sft"].steps_per_epoch(load_train_config("edit-sft", "edit-sft", ["optim.global_batch_size=4"]), items) == 2


def scalar_head(embedded_dir, folder: Path, labels: int = 1) -> str:
    """A model folder whose config.json says `labels` outputs per sequence (all a dry run reads of it)."""
    config = json.loads((Path(embedded_dir) / "config.json").read_text())
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**config, "id2label": {str(i): f"LABEL_{i}" for i in range(labels)}}))
    return str(folder)


@pytest.mark.parametrize("stage", ["feedback-sft", "edit-sft", "edit-rm", "edit-rloo"])
def test_a_dry_run_prepares_reports_and_names_the_stages_batch_key(embedded_dir, tmp_path, capsys, stage):
    key = RECIPES[stage].batch_key
    rm = [f"rloo.reward_model={scalar_head(embedded_dir, tmp_path / 'rm')}"] if stage == "edit-rloo" else []
    cfg = load_train_config(stage, stage, [f"data.dir={FIXTURES}", f"model={embedded_dir}", f"output_dir={tmp_path}", f"{key}=100000", *rm])
    with pytest.raises(ConfigError, match=rf"^{stage}: \d+ train items make no full step of 100000; lower {key} or add data$"):
        run_training(cfg, dry_run=True)
    assert capsys.readouterr().out.startswith(f"data for {stage}:\n")
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert report["stage"] == stage and report["train"] > 0 and report["validation"] > 0
    if stage == "edit-sft":  # the numbers tests/test_train.py trains on
        assert report["source_rows"] == {"edit/train": 3, "edit/validation": 1} and report["train"] == 14
