"""The distillation prompts (`fescale prepare distill-prompts`): HelpSteer3 `feedback` -> prompt files.

The paper distills the Feedback-Edit system into one model trained on "all unique first-turn
prompts of Feedback Demonstration": 22,644 prompts, 21,850 train and 794 validation
(../shared/method.md). Feedback Demonstration is every row of the `feedback` subset, so:
- first turn: a context with one user turn and no assistant turn (a leading system turn is kept);
  later turns of a conversation are answered in their context, which a distilled answer is not;
- unique: one prompt per distinct conversation (exact messages), the first occurrence kept;
- split: the published files, as every training stage reads them (`train.recipe.Sources.splits`).
  A validation prompt that is also a train prompt is kept once, in train, so the two sets are
  disjoint and the validation answers are of prompts the student never trained on. That is the
  reading that fits the paper's counts: 794 is 3.5% of 22,644, where the published split holds 5%
  of the rows, so part of the validation prompts are ones train also asks. Without a validation
  file the rows are split as the training stages split them (`prepare.split_rows`, seeded).
Each prompt is written as `{id, messages}`, the id the content hash `engine.inputs` gives a row
without one, so `fescale distill --input OUT/train.jsonl` reads the file as is and a rerun on the
same data writes the same ids.

Bad rows: unlike training, where one bad row stops the run (a training set that silently shrank is
another set), a bad row here is one prompt fewer: like `fescale distill`'s input, it is reported
with its `FILE:LINE: why` and the job goes on. Only a subset that cannot be read at all stops it.
The command writes OUT/train.jsonl and OUT/validation.jsonl and nothing else; it never replaces a
file (an existing one is an error before anything is read) and removes only a file it was writing
when it failed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from actors.errors import ConfigError
from engine.inputs import to_prompt
from train import data, prepare

SPLITS = data.SPLITS  # the names of the written files: OUT/<split>.jsonl


@dataclass
class DistillPrompts:
    """What `collect` found: the prompts per split, what it left out and why, and the bad rows."""

    prompts: dict[str, list[dict]]
    drops: prepare.Drops = field(default_factory=prepare.Drops)
    bad: list[str] = field(default_factory=list)  # "FILE:LINE: why", one per malformed row
    rows: dict[str, int] = field(default_factory=dict)  # valid source rows per split

    def counts(self) -> str:
        return f"{len(self.prompts['train'])} train, {len(self.prompts['validation'])} validation"


def first_turn(messages: list[dict]) -> bool:
    """One user turn and nothing said before it (a system turn is setup, not a turn of the conversation)."""
    return [m["role"] for m in messages if m["role"] != "system"] == ["user"]


def collect(data_dir: str | Path, validation_fraction: float = 0.05, seed: int = 0) -> DistillPrompts:
    """The first-turn, deduplicated prompts of the `feedback` subset under `data_dir`, per split."""
    loaded, bad = {}, []
    for split, path in data.subset_files(data_dir, "feedback", "--data-dir").items():
        loaded[split], errors = data.check_file(path, lambda row: data.check_row(row, "feedback"))
        bad += errors
    train, validation = loaded["train"], loaded.get("validation")
    if validation is None:
        train, validation = prepare.split_rows(train, validation_fraction, seed)
    result = DistillPrompts({split: [] for split in SPLITS}, bad=bad, rows={"train": len(train), "validation": len(validation)})
    seen: dict[str, str] = {}  # the prompt's messages as JSON -> the split it went to
    for split, rows in (("train", train), ("validation", validation)):
        for row in rows:
            messages = row["context"]
            key = json.dumps(messages, sort_keys=True)
            if not first_turn(messages):
                result.drops.add("not a first-turn prompt")
            elif key in seen:
                result.drops.add("validation prompt also in train" if seen[key] != split else f"duplicate prompt in {split}")
            else:
                seen[key] = split
                result.prompts[split].append({"id": to_prompt({"messages": messages}).id, "messages": messages})
    return result


def targets(output_dir: str | Path) -> dict[str, Path]:
    """The files the command writes; any that exists already is an error (nothing is replaced)."""
    out = Path(output_dir)
    files = {split: out / f"{split}.jsonl" for split in SPLITS}
    existing = [str(p) for p in files.values() if p.exists()]
    if existing:
        raise ConfigError(
            f"--output-dir {out} already holds {', '.join(existing)}; distill-prompts never replaces a file: "
            "remove them or choose another --output-dir"
        )
    return files


def write(result: DistillPrompts, output_dir: str | Path) -> dict[str, Path]:
    """OUT/<split>.jsonl, one `{id, messages}` row per prompt. Each file is created exclusively, so one
    that appeared since `targets` checked is not replaced either; a file left half written by a
    failure is removed (it is this command's own)."""
    files = targets(output_dir)
    files["train"].parent.mkdir(parents=True, exist_ok=True)
    for split, path in files.items():
        try:
            f = open(path, "x", encoding="utf-8")
        except FileExistsError:
            raise ConfigError(f"{path} appeared while distill-prompts was writing; it was left as it is") from None
        with f:
            try:
                f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in result.prompts[split])
            except BaseException:
                path.unlink()
                raise
    return files
