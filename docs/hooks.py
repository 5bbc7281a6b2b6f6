"""mkdocs hook: the site takes RESULTS.md, the notes and figures under results/ and
CHANGELOG.md from the repository at build time (generated files stay where their generators
write them; nothing is copied into docs/)."""
from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

REPO = Path(__file__).resolve().parents[1]
#: repository files served as pages: source -> page in the site
PAGES = {"RESULTS.md": "RESULTS.md", "CHANGELOG.md": "changelog.md"}
#: every file under results/ is served at the same path: RESULTS.md links its figures as
#: results/figures/..., the notes link back to ../../RESULTS.md, and a page may link a log


def on_files(files: Files, config) -> Files:
    for src, uri in PAGES.items():
        files.append(File.generated(config, uri, abs_src_path=str(REPO / src)))
    for path in sorted((REPO / "results").rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            uri = path.relative_to(REPO).as_posix()
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
