"""The documentation site's strict build catches what it is there to catch: a broken link, a
missing anchor and a cross-reference to an object the site does not document fail it (CI
builds the real site with ``mkdocs build --strict``, .ci/run); and the reStructuredText roles
of the docstrings become cross-references."""
from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_strict_build_fails_on_broken_links_and_references(tmp_path, caplog):
    pytest.importorskip("mkdocstrings_handlers.python")
    from mkdocs import exceptions
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    docs = tmp_path / "docs"
    shutil.copytree(REPO / "docs", docs)
    page = docs / "getting-started.md"
    page.write_text(page.read_text() + "\n[gone](no-such-page.md), [anchor](design.md#no-such-"
                    "anchor), [`ref`][localopt.no_such_function]\n")
    cfg = load_config(str(REPO / "mkdocs.yml"), docs_dir=str(docs),
                      site_dir=str(tmp_path / "site"))
    with caplog.at_level(logging.WARNING), pytest.raises(exceptions.Abort):
        build(cfg)
    text = caplog.text
    assert "no-such-page.md" in text and "no-such-anchor" in text
    assert "localopt.no_such_function" in text


def test_docstring_roles_become_cross_references():
    griffe = pytest.importorskip("griffe")
    sys.path.insert(0, str(REPO / "docs"))
    try:
        import griffe_rst
    finally:
        sys.path.remove(str(REPO / "docs"))
    pkg = griffe.load("localopt", search_paths=[str(REPO)], resolve_aliases=False)
    wrap = pkg["wrap.wrap"]
    convert = lambda s, obj=wrap: griffe_rst.convert(s, obj)   # noqa: E731
    assert convert(":func:`localopt.wrap`") == "[`localopt.wrap()`][localopt.wrap.wrap]"
    assert convert(":class:`~localopt.optim.LocalOptimizer`") == \
        "[`LocalOptimizer`][localopt.optim.local.LocalOptimizer]"
    assert convert(":func:`feedback_seed`") == "[`feedback_seed()`][localopt.wrap.feedback_seed]"
    assert convert(":math:`x^2`") == "`x^2`"
    assert convert(":func:`torch.autograd.grad`") == "`torch.autograd.grad()`"
    assert convert(":func:`localopt.no_such`") == "[`localopt.no_such()`][localopt.no_such]"
    assert convert("the rule::\n\n    dx = delta B\n") == "the rule:\n\n    dx = delta B\n"


def test_readme_is_short_and_keeps_the_generated_blocks():
    text = (REPO / "README.md").read_text()
    assert len(text.encode()) <= 12_000
    for marker in ("results", "pipeline"):
        assert text.count(f"<!-- {marker}:begin -->") == 1, marker
        assert text.index(f"<!-- {marker}:begin -->") < text.index(f"<!-- {marker}:end -->")


def test_readme_links_point_at_files_of_the_repository():
    """README.md is not part of the site's strict build: its relative links are checked here."""
    import re
    text = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link]
    assert any(link.startswith("docs/") for link in local)
    missing = [link for link in local if not (REPO / link).exists()]
    assert not missing, missing
