"""Every fenced ``python`` block of README.md and of the documentation pages runs.

The blocks of one file run in order in one namespace that starts with ``torch``, ``nn``,
``F``, ``localopt`` and ``loader`` (two random CIFAR-shaped batches of 4 images).  A block
preceded by ``<!-- skip: REASON -->`` is not run (several processes, a GPU, names from the
reader's own code); the reason is required.  ``torch.compile`` runs with the ``eager``
backend here (the example's code path, without minutes of CPU code generation; compiled
training itself is tested in test_compile.py)."""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FILES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^`\s]*)")
SKIP = re.compile(r"^\s*<!--\s*skip:\s*(\S.*?)\s*-->\s*$")

pytestmark = pytest.mark.usefixtures("one_thread")


def code_blocks(text: str) -> list[tuple[int, str, str, str | None]]:
    """``(line, language, code, skip reason)`` of every top-level fenced block."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = len(m.group(1)), m.group(2), m.group(3).lower()
        prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        skip = SKIP.match(prev)
        body, j = [], i + 1
        while j < len(lines) and not re.match(rf"^\s*{fence[0]}{{{len(fence)},}}\s*$", lines[j]):
            line = lines[j]
            body.append(line[indent:] if not line[:indent].strip() else line.lstrip())
            j += 1
        blocks.append((i + 1, lang, "\n".join(body) + "\n", skip.group(1) if skip else None))
        i = j + 1
    return blocks


def test_block_parser():
    text = ("intro\n<!-- skip: two processes -->\n```python\nA\n```\n\n* item\n\n"
            "  ```python\n  B\n    C\n  ```\n````markdown\n```python\nD\n```\n````\n~~~bash\nE\n~~~\n")
    assert code_blocks(text) == [(3, "python", "A\n", "two processes"),
                                 (9, "python", "B\n  C\n", None),
                                 (13, "markdown", "```python\nD\n```\n", None),
                                 (18, "bash", "E\n", None)]


def _namespace() -> dict:
    import torch.nn.functional as F
    from torch import nn

    import localopt
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g))
              for _ in range(2)]
    return {"torch": torch, "nn": nn, "F": F, "localopt": localopt, "loader": loader,
            "__name__": "__docs__"}


def runnable_blocks(path: Path) -> list[tuple[int, str, str, str | None]]:
    return [b for b in code_blocks(path.read_text()) if b[1] in ("python", "py") and b[3] is None]


@pytest.mark.parametrize("path", [f for f in FILES if runnable_blocks(f)],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_python_examples_run(path, monkeypatch):
    runnable = runnable_blocks(path)
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile",
                        lambda model, **kw: real_compile(model, **{**kw, "backend": "eager"}))
    torch.manual_seed(0)
    ns = _namespace()
    for line, _, code, _ in runnable:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                exec(compile(code, f"{path.name}:{line}", "exec"), ns)
        except Exception as e:
            raise AssertionError(f"{path.relative_to(REPO)}, block at line {line} failed: "
                                 f"{type(e).__name__}: {e}") from e


def test_every_markdown_file_is_checked():
    """The pages the site builds are the ones this test reads (no page outside docs/)."""
    yaml = pytest.importorskip("yaml")
    cfg = yaml.safe_load((REPO / "mkdocs.yml").read_text().replace("!!python", "python"))

    def pages(nav):
        for item in nav:
            for value in (item.values() if isinstance(item, dict) else [item]):
                if isinstance(value, list):
                    yield from pages(value)
                else:
                    yield value
    assert runnable_blocks(REPO / "README.md")
    generated = {"RESULTS.md", "changelog.md"}   # from the repository, by docs/hooks.py
    for page in pages(cfg["nav"]):
        if page not in generated:
            assert REPO / "docs" / page in FILES, page
