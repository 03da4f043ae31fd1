"""Edit reward model (edit-rm): a Bradley-Terry scalar head on the Edit SFT model.

The paper's batch design: each optimizer step holds `rm.tuples_per_step` (32) *distinct*
(prompt, original, feedback) tuples, and each tuple contributes two pairs, (bad edit < good edit) and
(no edit = the original < good edit), so the model learns both "this edit is better than that one"
and "the good edit improved on the original" in a 1:1 ratio. `rm_steps` builds those steps.
As in the paper, the RM ranks edits of one tuple: every sequence is the edit conversation (prompt,
original response, the edit instruction with the feedback: what the editor sees) followed by the
edit, so it judges an edit against the feedback it was meant to apply. Edit RLOO scores its rollouts
the same way. The result is a `sequence_classification` model that reads edit conversations; it is
not a scorer of (prompt, answer) for the engine's final selection.
`RECIPE` makes it a stage: Edit Preference tuples from the `edit_quality` subset, and an epoch of as
many steps as `rm_steps` can fill.
"""

from __future__ import annotations

import random

import torch

from actors.chat_format import ChatFormatter
from actors.models import resolve_model
from train import prepare
from train.config import TrainConfig
from train.loop import TaskBase
from train.losses import bradley_terry
from train.recipe import Recipe, Sources
from train.tokens import pad_right, tokenize_preferences

PAIRS = (("good", "bad"), ("good", "original"))  # (chosen, rejected) per tuple


def rm_steps(items: list[dict], per_step: int, seed: int) -> list[list[dict]]:
    """Steps of `per_step` items with pairwise distinct `key`s, in a seeded order.

    Items sharing a key (the same tuple with other edits) go to different steps; what cannot fill a
    whole step of distinct tuples at the end is left out, like drop_last.
    """
    pending = list(items)
    random.Random(seed).shuffle(pending)
    steps: list[list[dict]] = []
    while True:
        step, keys, rest = [], set(), []
        for item in pending:
            if len(step) < per_step and item["key"] not in keys:
                step.append(item)
                keys.add(item["key"])
            else:
                rest.append(item)
        if len(step) < per_step:
            return steps
        steps.append(step)
        pending = rest


class RewardModelTask(TaskBase):
    metric, mode = "val_loss", "min"

    def build_model(self) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(resolve_model(self.cfg.model), num_labels=1, dtype=self.dtype)
        model.config.pad_token_id = self.pad_id  # the head reads the last non-pad token
        return model

    def _pairs(self, engine, items: list[dict]):
        names = ("good", "bad", "original")
        ids, mask = pad_right([it[name] for it in items for name in names], self.pad_id, engine.device)
        scores = engine(input_ids=ids, attention_mask=mask).logits.squeeze(-1).view(len(items), 3)
        col = {name: scores[:, i] for i, name in enumerate(names)}
        chosen = torch.cat([col[c] for c, _ in PAIRS])
        rejected = torch.cat([col[r] for _, r in PAIRS])
        return chosen, rejected, int(mask.sum())

    def loss(self, engine, items: list[dict]):
        chosen, rejected, tokens = self._pairs(engine, items)
        loss, accuracy = bradley_terry(chosen, rejected)
        return loss, {"accuracy": float(accuracy)}, tokens

    @torch.no_grad()
    def evaluate(self, engine) -> dict[str, tuple[float, float]]:
        engine.eval()
        loss_sum = correct = pairs = 0.0
        for items in self.validation.batches(self.cfg.optim.micro_batch_size):
            chosen, rejected, _ = self._pairs(engine, items)
            loss, accuracy = bradley_terry(chosen, rejected)
            loss_sum += float(loss) * len(chosen)
            correct += float(accuracy) * len(chosen)
            pairs += len(chosen)
        return {"val_loss": (loss_sum, pairs), "val_accuracy": (correct, pairs)}


class RewardModelRecipe(Recipe):
    def prepare(self, cfg: TrainConfig, fmt: ChatFormatter, sources: Sources) -> tuple[list, list]:
        d = cfg.data
        return tuple(
            tokenize_preferences(fmt, prepare.edit_preferences(rows, sources.drops, d.domains, d.joiner), d.max_seq_len, sources.drops)
            for rows in sources.splits("edit_quality")
        )

    def steps(self, cfg: TrainConfig, train: list, epoch_seed: int) -> list[list[dict]]:
        """Steps of distinct tuples: fewer than len // tuples_per_step when a tuple's edits cannot all go
        to distinct steps (and how many depends on the epoch's seed)."""
        return rm_steps(train, self.items_per_step(cfg), epoch_seed)


RECIPE = RewardModelRecipe("edit-rm", RewardModelTask, batch_key="rm.tuples_per_step")
