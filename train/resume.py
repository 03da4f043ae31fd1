"""Resume only the training a checkpoint holds: a config fingerprint in every checkpoint, checked on rerun.

Rerunning `fescale train` with the same output_dir resumes from the latest checkpoint; rerunning it
with an edited config would silently continue that run under other settings (another learning rate,
other data, another batch), and the result would match neither config. So every checkpoint's
`state.json` holds the fingerprint of its config (the flattened keys that change what is trained),
the driver compares it with the new config before starting workers, and a difference is a
`ConfigError` naming each changed key, unless the config says `resume: force`.

Left out of the fingerprint, so they may change between runs: where things are written and how often
(`output_dir`, `log_every`, `checkpoint_every`, `keep_checkpoints`), how long the run goes on
(`optim.epochs`, `optim.max_steps`: extending a run is what resuming is for; an epoch's order depends
only on the seed and the epoch), how it is computed without changing the math
(`gradient_checkpointing`, `resources.cpus_per_worker`, `resources.threads`), how it recovers
(`resources.max_failures`) and `resume` itself. `resources.num_workers` stays in: a ZeRO checkpoint is
partitioned over the workers that wrote it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from actors.errors import ConfigError
from engine import storage
from engine.config_kit import short
from engine.storage import Location
from train.config import TrainConfig

NEUTRAL_KEYS = frozenset({
    "output_dir", "log_every", "checkpoint_every", "keep_checkpoints", "resume", "gradient_checkpointing",
    "optim.epochs", "optim.max_steps", "resources.cpus_per_worker", "resources.threads", "resources.max_failures",
})
MISSING = "<unset>"


def fingerprint(cfg: TrainConfig) -> dict[str, Any]:
    """The config's keys that change training, flattened to dotted names (JSON values)."""
    return {k: v for k, v in _flatten(cfg.model_dump(mode="json")).items() if k not in NEUTRAL_KEYS}


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key (old -> new)` for every key whose value differs, sorted; a key only one side has counts."""
    return [
        f"{k} ({short(old.get(k, MISSING))} -> {short(new.get(k, MISSING))})"
        for k in sorted(old.keys() | new.keys())
        if old.get(k, MISSING) != new.get(k, MISSING)
    ]


def check_resume(cfg: TrainConfig, run_dir: Location) -> None:
    """Refuse to resume the latest checkpoint under `run_dir` with a config that changes training."""
    state = latest_state(run_dir)
    if state is None or "config" not in state:  # nothing to resume, or a checkpoint from before fingerprints
        return
    changed = changed_keys(state["config"], fingerprint(cfg))
    if not changed:
        return
    where = f"the checkpoint at step {state['step']} under {run_dir}"
    if cfg.resume == "force":
        print(f"resume: force: resuming {where} despite changed keys: {', '.join(changed)}", flush=True)
        return
    raise ConfigError(
        f"this config changes training keys since {where}: {', '.join(changed)}. Rerun with the old values, "
        "use another output_dir to start afresh, or set resume=force to continue that run with these values"
    )


def latest_state(run_dir: Location) -> dict | None:
    """`state.json` of the checkpoint Ray Train would resume from (its latest), or None if it has none."""
    import ray.train

    if not storage.exists(run_dir):
        return None
    try:
        checkpoint = ray.train.Result.from_path(run_dir.path, storage_filesystem=run_dir.fs).checkpoint
    except RuntimeError:  # a run folder whose first checkpoint was never registered
        return None
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return json.loads(Path(d, "state.json").read_text())


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
