"""Training config: one YAML per stage (`configs/train/*.yaml`) -> a validated `TrainConfig`.

Defaults are the paper's (HelpSteer3, Appendix G): 1 epoch, AdamW, constant LR after 10 warmup
steps, global batch 128; the learning rate and the data source depend on the stage (`STAGE_LR`).
Loaded by the config kit (`engine.config_kit`), as the engine's config: an unknown key or a wrong
value is one `ConfigError` naming it, in the same format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from engine.config import CONFIGS_DIR, RoleConfig
from engine.config_kit import StrictModel, error, read, short, validate

Stage = Literal["feedback-sft", "edit-sft", "distill-sft", "edit-rm", "edit-rloo"]
STAGES: tuple[str, ...] = Stage.__args__
STAGE_LR = {"feedback-sft": 1e-6, "edit-sft": 1e-6, "distill-sft": 1e-6, "edit-rm": 3e-6, "edit-rloo": 5e-7}
TRAIN_CONFIGS = CONFIGS_DIR / "train"
# transformers' attention kernels that need nothing from a hub (its "kernels-community/..." names fetch code).
AttnImplementation = Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"]


class DataConfig(StrictModel):
    dir: str | None = Field(None, description="HelpSteer3 root holding <subset>/train.jsonl.gz (feedback, edit, edit_quality)")
    distill: str | None = Field(None, description="a `fescale distill` output folder or .sft.jsonl file (distill-sft)")
    max_seq_len: PositiveInt = 4096
    packing: bool = Field(False, description="SFT: concatenate examples into sequences of up to max_seq_len, none attending to another; global_batch_size then counts packed sequences")
    validation_fraction: float = Field(0.05, gt=0, lt=1, description="split off (seeded) when a subset has no validation file")
    max_level_spread: NonNegativeInt = Field(2, description="feedback-sft: drop responses whose feedback levels differ by more")
    feedback_targets: Literal["all", "one"] = Field("all", description="feedback-sft: train on every feedback of a response, or one")
    domains: list[str] = Field(["general", "stem"], description="edit-rm and edit-rloo: domains kept for Edit Preference (the RM's tuples, RLOO's prompts)")
    applied_check: RoleConfig | None = Field(None, description="edit-sft: model asked whether the change summary addresses each feedback; off when unset")
    joiner: str = "\n"
    limit: PositiveInt | None = Field(None, description="use at most this many rows per split (smoke runs)")


class OptimConfig(StrictModel):
    lr: PositiveFloat | None = Field(None, description="default per stage: SFT 1e-6, RM 3e-6, RLOO 5e-7")
    warmup_steps: NonNegativeInt = 10
    weight_decay: float = 0.0
    global_batch_size: PositiveInt = Field(128, description="SFT stages: sequences per optimizer step (edit-rm: rm.tuples_per_step, edit-rloo: rloo.rollout_batch_size prompts)")
    micro_batch_size: PositiveInt = Field(1, description="per worker and forward pass; gradient accumulation makes up the rest")
    epochs: PositiveInt = 1
    max_steps: PositiveInt | None = Field(None, description="stop after this many optimizer steps")
    grad_clip: PositiveFloat = 1.0


class ResourcesConfig(StrictModel):
    num_workers: PositiveInt = 1
    use_gpu: bool = False
    cpus_per_worker: PositiveFloat = 1.0
    threads: PositiveInt | None = Field(None, description="torch threads per worker; default ceil(cpus_per_worker)")
    max_failures: NonNegativeInt = Field(2, description="times Ray Train restarts a failed worker group from the latest checkpoint")


class DeepSpeedConfig(StrictModel):
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload: bool = Field(False, description="ZeRO-Offload optimizer (and ZeRO-3 parameters) to CPU memory")
    extra: dict[str, Any] = Field(default_factory=dict, description="merged into the generated DeepSpeed config")


class RMConfig(StrictModel):
    tuples_per_step: PositiveInt = Field(32, description="distinct (prompt, original, feedback) tuples per step, 2 pairs each")


class RLOOConfig(StrictModel):
    reward_model: str | None = Field(None, description="the Edit RM folder (edit-rm's output)")
    rollouts_per_prompt: int = Field(4, ge=2)
    rollout_batch_size: PositiveInt = Field(64, description="prompts per step")
    temperature: PositiveFloat = 1.0
    top_p: float = Field(0.9, gt=0, le=1)
    max_tokens: PositiveInt = 2048
    kl_coef: float = Field(0.01, ge=0)
    rollout: RoleConfig = Field(default_factory=RoleConfig, description="the engine backend that samples rollouts (model: the policy)")


class TrainConfig(StrictModel):
    stage: Stage
    model: str = Field(description="starting model: 'embedded', a HF folder, or an earlier stage's output")
    output_dir: str = Field(description="a local folder or a URI (s3://, gs://, ...): checkpoints, metrics.jsonl, data_report.json and the final model/")
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    checkpoint_every: PositiveInt = Field(50, description="optimizer steps between checkpoints (each with a validation pass)")
    keep_checkpoints: PositiveInt = Field(1, description="best checkpoints kept by the validation metric (the latest is always kept to resume)")
    log_every: PositiveInt = 1
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass: much less memory for about a third more compute")
    attn_implementation: AttnImplementation | None = Field(None, description="the trained model's attention kernel; unset: transformers' default (sdpa)")
    resume: Literal["check", "force"] = Field("check", description="resuming from a checkpoint trained with other values of keys that change training: refused (check) or allowed (force)")
    rm: RMConfig = Field(default_factory=RMConfig)
    rloo: RLOOConfig = Field(default_factory=RLOOConfig)

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.stage == "distill-sft" and not self.data.distill:
            raise ValueError("stage distill-sft needs `data.distill`: a `fescale distill` output folder")
        if self.stage != "distill-sft" and not self.data.dir:
            raise ValueError(f"stage {self.stage} needs `data.dir`: the HelpSteer3 folder")
        if self.data.packing and self.stage in ("edit-rm", "edit-rloo"):
            raise ValueError(f"`data.packing` is for the SFT stages; {self.stage} scores whole sequences, one per row")
        if self.stage == "edit-rloo" and not self.rloo.reward_model:
            raise ValueError("stage edit-rloo needs `rloo.reward_model`: the Edit RM (edit-rm's output folder)")
        return self

    @property
    def lr(self) -> float:
        return self.optim.lr or STAGE_LR[self.stage]


def load_train_config(path: str | Path | None, stage: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """A YAML file or a preset in configs/train/ (by name), the stage from the CLI, `key=value` overrides."""
    data, source = read(path, what="training config", presets_dir=TRAIN_CONFIGS)
    if stage is not None:
        if data.get("stage") not in (None, stage):
            raise error("training config", source, f"`stage`: this is a config for stage {short(data['stage'])}, not {stage!r}")
        data["stage"] = stage
    return validate(TrainConfig, data, overrides or (), what="training config", source=source)
