"""How every benchmark reports: the table and a note on stdout, the table appended to
`benchmarks/results/<name>.md` under the command that made it, the raw numbers in `<name>.json`, and
the headline as the last line, `<metric>=<value>` (what scripts and the README pick up).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def record(prefix: str | Path, module: str, argv: list[str] | None, table: str, note: str, data: dict, metric: str, value: object) -> None:
    out = Path(prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = f"python -m {module} " + " ".join(argv if argv is not None else sys.argv[1:])
    with out.with_suffix(".md").open("a") as f:
        f.write(f"\n## {time.strftime('%Y-%m-%d %H:%M')} `{command.strip()}`\n\n{table}\n\n{note}\n")
    out.with_suffix(".json").write_text(json.dumps({"command": command.strip(), "note": note, **data}, indent=2))
    print(table)
    print(f"\n{note}")
    print(f"{metric}={value}")
