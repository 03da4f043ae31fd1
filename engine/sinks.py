"""Where finished rows go. `JsonlSink` serves `fescale run`; `engine.distill.ShardSink` serves distill.

`fescale run --output out.jsonl` writes, as rows finish (in finishing order; `id` is the key):
- `out.jsonl`: output rows (README "Output format"),
- `out.sft.jsonl`: `{id, messages}` with the final answer as the last assistant turn,
- `out.errors.jsonl`: malformed input rows and prompts a stage failed, with the reason,
- `out.summary.json`: the run summary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Iterable, Protocol

from engine.inputs import InputErrorRow
from engine.rows import PromptState


class Sink(Protocol):
    def write(self, states: list[PromptState]) -> None: ...

    def close(self) -> None: ...


def sibling(output: Path, suffix: str) -> Path:
    """out.jsonl -> out.<suffix>"""
    return output.with_name(output.name.removesuffix(".jsonl") + suffix)


def write_lines(f: IO[str], rows: Iterable[dict]) -> None:
    for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")


class JsonlSink:
    def __init__(self, output: Path, input_errors: list[InputErrorRow]):
        output.parent.mkdir(parents=True, exist_ok=True)
        self.paths = {"output": output, "sft": sibling(output, ".sft.jsonl"), "errors": sibling(output, ".errors.jsonl")}
        self.files = {k: open(p, "w", encoding="utf-8") for k, p in self.paths.items()}
        write_lines(self.files["errors"], (e.to_json() for e in input_errors))

    def write(self, states: list[PromptState]) -> None:
        write_lines(self.files["output"], (s.output_row() for s in states if s.error is None))
        write_lines(self.files["sft"], (s.sft_row() for s in states if s.error is None))
        write_lines(self.files["errors"], (s.error_row() for s in states if s.error is not None))
        for f in self.files.values():
            f.flush()

    def close(self) -> None:
        for f in self.files.values():
            f.close()
