"""Where a training run writes: `output_dir` as a local folder or a URI (s3://, gs://, ... as
`engine.storage` resolves it), the same layout either way.

    OUTPUT/data_report.json   the driver's data report
    OUTPUT/metrics.jsonl      one record per logged step, validation and resume (rank 0)
    OUTPUT/tensorboard/       the same as TensorBoard events, where TensorBoard is installed
    OUTPUT/ray/<stage>/       Ray Train's checkpoints (Ray writes them through the same filesystem)
    OUTPUT/model/             the best checkpoint as a plain Hugging Face folder, once complete

A local folder is written in place, as a user tails it. On an object store nothing can be appended
to, so rank 0 writes metrics and events into a local staging folder and `push` uploads them at each
checkpoint and at the end; a resumed run first pulls the metrics so far, so `metrics.jsonl` goes on in
one file. Steps logged after the last checkpoint of a killed run are redone on resume, so losing them
from the staged copy loses nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from engine import storage
from engine.storage import Location

METRICS = "metrics.jsonl"
EVENTS = "tensorboard"


@dataclass(frozen=True)
class RunOutput:
    """A run's output location (picklable: it travels to the training workers with its filesystem)."""

    loc: Location

    @classmethod
    def of(cls, output_dir: str) -> RunOutput:
        return cls(storage.resolve(output_dir))

    def checkpoints(self, stage: str) -> Location:
        """Ray Train's `storage_path` (`loc.path`) and `storage_filesystem` (`loc.fs`) for the stage."""
        return self.loc.join("ray", stage)

    def write_text(self, name: str, text: str) -> None:
        storage.write_bytes(self.loc.join(name), text.encode())

    def staging(self) -> Path:
        """The local folder rank 0 writes metrics and events into: the output itself when it is local,
        otherwise a new temporary folder holding the metrics written so far (`METRICS`)."""
        storage.ensure_dir(self.loc)
        if self.loc.local:
            return Path(self.loc.path)
        folder = Path(tempfile.mkdtemp(prefix="fescale-train-"))
        earlier = storage.read_bytes(self.loc.join(METRICS))
        if earlier is not None:
            (folder / METRICS).write_bytes(earlier)
        return folder

    def push(self, staged: Path) -> None:
        """Upload what rank 0 staged (nothing to do for a local output: it wrote in place)."""
        if self.loc.local:
            return
        if (staged / METRICS).is_file():
            storage.write_bytes(self.loc.join(METRICS), (staged / METRICS).read_bytes())
        if (staged / EVENTS).is_dir():
            storage.upload_dir(str(staged / EVENTS), self.loc.join(EVENTS))

    def publish_model(self, source: Path) -> Location:
        """Make `source` (a checkpoint's model folder) OUTPUT/model, never leaving a half model that
        looks complete: locally a rename (`replace_folder`); on other filesystems, which cannot rename
        a folder at once, `config.json` (what every loader reads first) is removed first and uploaded
        last, so a crash in between leaves a folder no loader takes for a model."""
        final = self.loc.join("model")
        if self.loc.local:
            replace_folder(source, Path(final.path))
            return final
        files = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
        storage.delete(final.join("config.json"))
        stale = [name for name in storage.tree(final) if name not in files]
        for name in stale:  # an earlier model's files (other shards) that this one does not overwrite
            storage.delete(final.join(name))
        for name in sorted(files, key=lambda n: n == "config.json"):
            storage.write_bytes(final.join(name), (source / name).read_bytes())
        return final


def replace_folder(source: Path, final: Path) -> None:
    """Copy `source` to `final` so that `final` is never a half-written folder.

    A crash mid-copy must not leave a `model/` the engine or the next stage would load as complete:
    the copy goes to a hidden `.model.partial-*` folder beside it and is renamed into place (a rename
    is atomic on one filesystem). A crash between moving an earlier `final` aside and renaming the new
    one leaves no `final` at all, never a wrong one. Partial folders a crash left are removed first.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = f".{final.name}.partial-"
    for stale in final.parent.glob(partial + "*"):
        shutil.rmtree(stale)
    tmp = Path(tempfile.mkdtemp(prefix=partial, dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would make the renamed model unreadable to anyone else
    shutil.copytree(source, tmp, dirs_exist_ok=True)
    old = final.with_name(partial + "old")
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
