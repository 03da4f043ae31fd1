"""Training throughput: tokens/s of one SFT stage through fescale's path against a plain torch loop.

Both train the same tiny Llama (random weights from a config, SmolLM2's tokenizer: nothing is
downloaded) on the same items in the same order with the same batch: edit-sft on the HelpSteer3-shaped
fixtures (14 examples), `--batch` items per optimizer step in micro-batches of `--micro`, AdamW with
the stage's warmup, gradient clipping, `--threads` torch threads. fescale's path is `fescale train`
as a user runs it (`train.runner.train`: data preparation, a local Ray cluster, one Ray Train worker
reading its Ray Data shard, DeepSpeed ZeRO-2 on gloo, a validation pass and checkpoint at the end);
the plain loop is `torch.optim.AdamW` in this process over the steps `Recipe.schedule` plans, so the
first step's loss must match fescale's (same weights, same items).

The steady rate leaves out each path's first step (allocator and DeepSpeed warm-up) and everything
outside a step (start-up, validation, checkpoint, export): fescale's from the loop's own per-step
`tokens_per_s` in metrics.jsonl, the plain loop's timed the same way. The wall column is the whole
run, start-up included, for what a short run costs. The plain loop runs before and after fescale
(never at once), and fescale is set against both together: this machine drifts by 10-40% within
minutes, and a single plain run before fescale charged that drift to one side.

    python -m benchmarks.train_throughput --steps 10
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.record import record

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO.parent / "shared" / "fixtures" / "helpsteer3"


def tiny_llama(out: Path, hidden: int, layers: int) -> str:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from actors.models import EMBEDDED, resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(EMBEDDED))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), num_key_value_heads=1, max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def plain_loop(cfg, threads: int) -> dict:
    """The same steps with torch alone: AdamW, loss / accumulation, clip, step (what DeepSpeed does here)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.chat_format import ChatFormatter
    from train.loop import warmup_then_constant
    from train.runner import prepare_stage
    from train.sft import collate
    from train.stages import RECIPES

    tic = time.perf_counter()
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    recipe = RECIPES[cfg.stage]
    prepared = prepare_stage(cfg, ChatFormatter(AutoTokenizer.from_pretrained(cfg.model), cfg.data.max_seq_len))
    pad_id = AutoTokenizer.from_pretrained(cfg.model).pad_token_id
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32).train()
    o = cfg.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=o.weight_decay)
    schedule = warmup_then_constant(optimizer, o.warmup_steps)
    micro_batches = recipe.items_per_step(cfg) // o.micro_batch_size
    steps = []
    for _, items in recipe.schedule(cfg, prepared.train, o.max_steps):
        start, losses = time.perf_counter(), []
        for i in range(0, len(items), o.micro_batch_size):
            loss = model(**collate(items[i : i + o.micro_batch_size], pad_id, "cpu")).loss
            (loss / micro_batches).backward()
            losses.append(float(loss))
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        tokens = sum(len(it["input_ids"]) for it in items)
        steps.append({"loss": sum(losses) / len(losses), "tokens": tokens, "seconds": time.perf_counter() - start})
    return {"steps": steps, "wall": time.perf_counter() - tic}


def fescale_run(cfg) -> dict:
    """`fescale train` itself; per-step tokens and seconds from its metrics.jsonl."""
    from train.runner import train

    tic = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - tic
    records = [r for r in map(json.loads, open(Path(cfg.output_dir) / "metrics.jsonl")) if r["kind"] == "train"]
    return {"steps": [{"loss": r["loss"], "tokens_per_s": r["tokens_per_s"]} for r in records], "wall": wall}


def steady(steps: list[dict], tokens: list[int]) -> float:
    """Tokens per second over every step but the first."""
    return sum(tokens[1:]) / sum(t / s["tokens_per_s"] if "tokens_per_s" in s else s["seconds"] for t, s in zip(tokens[1:], steps[1:]))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6, help="optimizer steps (the first is warm-up, not counted)")
    p.add_argument("--batch", type=int, default=14, help="items per optimizer step (the fixtures hold 14)")
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a training config override for both paths, e.g. deepspeed.zero_stage=0 (repeatable)")
    args = p.parse_args(argv)
    from train.config import load_train_config

    with tempfile.TemporaryDirectory(prefix="fescale-train-throughput-") as tmp:
        model = tiny_llama(Path(tmp, "model"), args.hidden, args.layers)
        cfg = load_train_config("edit-sft", "edit-sft", [
            f"model={model}", f"data.dir={FIXTURES}", f"output_dir={tmp}/run", f"optim.global_batch_size={args.batch}",
            f"optim.micro_batch_size={args.micro}", f"optim.max_steps={args.steps}", f"optim.epochs={args.steps}",
            "optim.warmup_steps=1", "optim.lr=1e-4", f"checkpoint_every={args.steps}", "resources.num_workers=1",
            f"resources.threads={args.threads}", "resources.max_failures=0", *args.set,
        ])
        before = plain_loop(cfg, args.threads)
        ours = fescale_run(cfg)
        after = plain_loop(cfg, args.threads)
    tokens = [s["tokens"] for s in before["steps"]]
    if len(ours["steps"]) != len(tokens):
        sys.exit(f"fescale logged {len(ours['steps'])} steps, the plain loop ran {len(tokens)}")
    runs = {"plain torch, before": before, "fescale (Ray Train + DeepSpeed)": ours, "plain torch, after": after}
    rates = {name: steady(run["steps"], tokens) for name, run in runs.items()}
    plain_seconds = sum(s["seconds"] for run in (before, after) for s in run["steps"][1:])
    rates["plain torch, both"] = 2 * sum(tokens[1:]) / plain_seconds
    ratio = rates["fescale (Ray Train + DeepSpeed)"] / rates["plain torch, both"]
    rows = [f"| {name} | {rates[name]:.0f} | {run['steps'][0]['loss']:.4f} | {run['wall']:.0f} |" for name, run in runs.items()]
    table = "\n".join(["| path | tokens/s (steps 2+) | step-1 loss | wall s (all) |", "|---|---|---|---|", *rows])
    note = (
        f"{args.steps} steps of {args.batch} items ({sum(tokens) // len(tokens)} tokens per step, micro-batch {args.micro}), "
        f"tiny Llama hidden {args.hidden} x {args.layers} layers, {args.threads} threads; ratio fescale / plain (both runs) = {ratio:.3f}"
    )
    data = {"args": vars(args), "tokens_per_s": rates, "ratio": ratio, "plain_before": before, "fescale": ours, "plain_after": after}
    record(REPO / "benchmarks" / "results" / "train_throughput", "benchmarks.train_throughput", argv, table, note, data, "ratio", f"{ratio:.3f}")


if __name__ == "__main__":
    main()
