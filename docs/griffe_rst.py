"""griffe extension: the project's docstrings use reStructuredText roles (``:func:`x```,
``:class:`~a.b.C```, ``:math:`...```) and ``::`` literal blocks; render them as Markdown for
mkdocstrings.

A role that names an object becomes a cross-reference to where the site documents it:
public names (``localopt.wrap``) resolve to their definition (``localopt.wrap.wrap``),
relative names to the documented object's class or module, and a member without a docstring
(which the site does not render) to its class.  Private names (``_x``) and objects outside the
project render as code.  Whatever else a role names must be documented: ``mkdocs build
--strict`` fails on a reference it cannot find.
"""
from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:py:)?(func|meth|class|mod|attr|data|obj|exc|math|const):`([^`]+)`")
OBJECT_ROLES = {"func", "meth", "class", "mod", "attr", "data", "obj", "exc", "const"}
PROJECT = ("localopt", "recipes", "models")


def _find(path: str, obj: griffe.Object):
    try:
        found = obj.modules_collection[path]
    except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None
    try:
        while found.is_alias:
            found = found.final_target
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None
    # `localopt.wrap` names both a module and the function it defines and the package
    # re-exports: the function is meant
    name = path.rsplit(".", 1)[-1]
    if found.is_module and name in found.members and not found.members[name].is_module:
        return _find(f"{found.path}.{name}", obj)
    return found


def _resolve(target: str, obj: griffe.Object):
    owner = obj if obj.is_class else (obj.parent if obj.parent is not None
                                       and obj.parent.is_class else None)
    scopes = [s for s in (owner, obj.module, obj.package) if s is not None]
    for path in [target] + [f"{s.path}.{target}" for s in scopes]:
        found = _find(path, obj)
        if found is not None:
            return found
    return None


def _role(match: re.Match, obj: griffe.Object) -> str:
    kind, target = match.groups()
    if kind not in OBJECT_ROLES:
        return f"`{target}`"
    short = target.startswith("~")
    target = target.lstrip("~")
    shown = target.rsplit(".", 1)[-1] if short else target
    if kind in ("func", "meth"):
        shown += "()"
    found = _resolve(target, obj)
    if found is None:
        if target.split(".")[0] not in PROJECT and "." in target:
            return f"`{shown}`"          # torch, the standard library, ...
        return f"[`{shown}`][{target}]"  # unknown: left for the strict build to report
    if any(part.startswith("_") and not part.startswith("__") for part in
           found.path.split(".")) or found.path.split(".")[0] not in PROJECT:
        return f"`{shown}`"
    if not found.docstring and found.parent is not None and found.parent.is_class:
        found = found.parent              # rendered only when documented
    return f"[`{shown}`][{found.path}]"


def convert(text: str, obj: griffe.Object) -> str:
    text = ROLE.sub(lambda m: _role(m, obj), text)
    # "text::" before an indented block: a literal block in RST, a code block in Markdown
    text = re.sub(r"(?m)^[ \t]*::[ \t]*$", "", text)
    text = re.sub(r"(?m)(\S)::[ \t]*$", r"\1:", text)
    return text


def _walk(obj: griffe.Object):
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)


class RstToMarkdown(griffe.Extension):
    """Convert every docstring of a loaded package (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        for obj in _walk(pkg):
            if obj.docstring is not None:
                obj.docstring.value = convert(obj.docstring.value, obj)
