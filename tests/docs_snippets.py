"""Find the code blocks of a Markdown page (no tests here; used by tests/test_docs_snippets.py).

A *snippet* is one thing a reader would copy: one line of an indented shell block (each
line of the docs' shell blocks is a command of its own), or a whole fenced block
(```python, ```toml, ```json).  An indented block whose first line is not a command
(a summary, an error message, sample output) is ``output``.
"""

from __future__ import annotations

import re
from pathlib import Path

from attrs import frozen

#: A line a reader types at a shell prompt: optional VAR=value assignments, then a command
#: this project's docs use.  ``cfn run: OK ...`` and ``cfn: error: ...`` are output.
SHELL_LINE = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)*(?:cfn|pip|python3?|pytest|cd|git|\.)\s")
OUTPUT_LINE = re.compile(r"^cfn(?: \w+)?:\s")


@frozen
class Snippet:
    page: str  # relative to the repository root
    line: int  # 1-based line of the snippet's first line
    lang: str  # shell, python, toml, json, output, or a fence's other language
    text: str

    @property
    def first_line(self) -> str:
        return self.text.strip().splitlines()[0].strip()

    @property
    def id(self) -> str:
        """``page: first line`` (a shell line without its comment): stable when lines move."""
        first = self.first_line
        if self.lang == "shell":
            first = re.sub(r"\s+#[^'\"]*$", "", first)
        return f"{self.page}: {' '.join(first.split())}"


def is_command(line: str) -> bool:
    return bool(SHELL_LINE.match(line)) and not OUTPUT_LINE.match(line)


def snippets(root: Path, page: str) -> list[Snippet]:
    """Every snippet of ``root/page`` in document order."""
    lines = (root / page).read_text().splitlines()
    out: list[Snippet] = []
    i = 0
    previous_blank = True
    while i < len(lines):
        line = lines[i]
        fence = re.match(r"^```(\w*)\s*$", line)
        if fence:
            start = i + 1
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                i += 1
            out.append(Snippet(page, start + 1, fence.group(1) or "text", "\n".join(lines[start:i]) + "\n"))
            i += 1
            previous_blank = False
            continue
        if line.startswith("    ") and previous_blank and line.strip():
            start = i
            block = []
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                block.append(lines[i][4:])
                i += 1
            while block and not block[-1].strip():
                block.pop()
            if is_command(block[0]):
                for n, text in enumerate(block):
                    if text.strip():
                        out.append(Snippet(page, start + n + 1, "shell", text.strip() + "\n"))
            else:
                out.append(Snippet(page, start + 1, "output", "\n".join(block) + "\n"))
            previous_blank = True
            continue
        previous_blank = not line.strip()
        i += 1
    return out
