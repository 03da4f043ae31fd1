"""Every training stage by name: `fescale train <stage>` runs `RECIPES[stage]` (train/runner.py).

A stage's recipe lives beside its Task; adding a stage is its module plus one entry here (and its
name in `train.config.Stage`, which the config is validated against).
"""

from __future__ import annotations

from train import reward_model, rloo, sft
from train.recipe import Recipe

RECIPES: dict[str, Recipe] = {recipe.name: recipe for recipe in (*sft.RECIPES, reward_model.RECIPE, rloo.RECIPE)}
