"""Writing a benchmark's table into docs/benchmarks.md between its markers (shared by bench scripts)."""

from __future__ import annotations

from pathlib import Path


def publish(text: str, name: str, markdown: str | None) -> None:
    """Print a benchmark's ``text`` and, with ``markdown``, write it into that file with its command."""
    print("\n" + text)
    if markdown:
        write_block(markdown, name, f"python bench/{name}.py --markdown {markdown}", text)


def write_block(path: str | Path, name: str, command: str, text: str) -> None:
    """Replace the block between ``<!-- name -->`` markers in ``path`` (append it if absent)."""
    mark = f"<!-- {name} -->"
    path = Path(path)
    doc = path.read_text() if path.exists() else ""
    block = f"{mark}\nCommand: `{command}`\n\n{text}\n{mark}"
    if doc.count(mark) == 2:
        head, _, rest = doc.partition(mark)
        _, _, tail = rest.partition(mark)
        doc = head + block + tail
    else:
        doc += "\n" + block + "\n"
    path.write_text(doc)
