"""The README's flag table, generated from the `TrainConfig` dataclass so the two never drift apart."""

from __future__ import annotations

from dataclasses import MISSING, fields
from pathlib import Path

from resumable.config import TrainConfig


def flags_markdown() -> str:
    """The README's flag table, generated from the dataclass so the two never drift apart."""
    rows = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for f in fields(TrainConfig):
        default = "" if f.default is MISSING or f.default is None else f"`{f.default}`"
        rows.append(f"| `--{f.name}` | {default} | {f.metadata['help']} |")
    return "\n".join(rows) + "\n"


def update_readme(path: Path) -> None:
    """Replace the table between the flag markers in README.md."""
    text = path.read_text()
    start, end = "<!-- flags:start -->\n", "<!-- flags:end -->"
    head, rest = text.split(start, 1)
    path.write_text(head + start + flags_markdown() + end + rest.split(end, 1)[1])
