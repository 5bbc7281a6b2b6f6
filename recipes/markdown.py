"""Generated blocks in hand-written Markdown files: the text between ``<!-- NAME:begin -->`` and
``<!-- NAME:end -->`` (README.md's results table, the pipeline headline of the model-parallel
guide) belongs to the command that generates it, the rest of the file to its authors."""
from __future__ import annotations

from pathlib import Path

from .common import ConfigError

__all__ = ["markers", "replace_block", "link_base"]


def link_base(page: Path | str) -> Path:
    """The folder that a generated block's relative links in ``page`` start from: the page's
    own folder, except for a page of the documentation site (under ``docs/``), whose links
    start from where the site serves it -- the site serves the repository's ``results/`` at
    its root (``docs/hooks.py``), so ``docs/guide/x.md`` links ``../results/...``."""
    page = Path(page).resolve()
    repo = Path(__file__).resolve().parents[1]
    docs = repo / "docs"
    if page.is_relative_to(docs):
        return repo / page.parent.relative_to(docs)
    return page.parent


def markers(name: str) -> tuple[str, str]:
    """The begin and end markers of the block ``name``: ``<!-- NAME:begin -->``,
    ``<!-- NAME:end -->``."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def replace_block(path: Path | str, name: str, text: str, *, write: bool = True) -> str:
    """The text of the file ``path`` with its block ``name`` replaced by the lines ``text``
    (markers kept, each on its own line around ``text``); written back when ``write`` and the
    block changed.  Raises :class:`recipes.common.ConfigError` naming the file and the marker
    when the file lacks either marker, has one twice, or has the end before the begin."""
    path = Path(path)
    old = path.read_text()
    begin, end = markers(name)
    for marker in (begin, end):
        if old.count(marker) != 1:
            raise ConfigError(f"{path}: {'no' if marker not in old else 'more than one'} "
                              f"{marker} line: the generated {name!r} block goes between "
                              f"{begin} and {end}")
    start, stop = old.index(begin), old.index(end)
    if stop < start:
        raise ConfigError(f"{path}: {end} comes before {begin}")
    new = old[:start] + f"{begin}\n{text}\n{end}" + old[stop + len(end):]
    if write and new != old:
        path.write_text(new)
    return new
