"""The ``localopt`` command: ``localopt <recipe> [options]`` runs ``localopt.recipes.<recipe>``.

    localopt train --model resnet20 --rule fa --epochs 40
    localopt benchmark --rules bp,fa,usf
    localopt step-time --model mlp3x1024 --rules bp,fa,dfa
    localopt <recipe> --help

The same as ``python -m localopt.recipes.<recipe> ...`` (and, in a checkout,
``python -m recipes.<recipe> ...``).
"""
from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

#: modules of this package that are libraries, not commands
_NOT_COMMANDS = {"cli", "common", "data", "plots", "alignment", "synthetic", "runlog", "variants",
                 "pipeline_report", "pipeline_sim", "pipeline_train", "divergence", "ranks",
                 "markdown", "results_load", "results_rows", "results_cells", "results_tables"}


def commands() -> list[str]:
    """The recipe names ``localopt`` accepts (modules of this package with a ``main``)."""
    here = [m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])]
    return sorted(n.replace("_", "-") for n in here if n not in _NOT_COMMANDS)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    names = commands()
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\nrecipes: " + ", ".join(names))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in names:
        print(f"localopt: unknown recipe {name!r}; recipes: {', '.join(names)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"{__package__}.{name.replace('-', '_')}")
    if not hasattr(module, "main"):
        print(f"localopt: recipe {name!r} has no command-line entry", file=sys.stderr)
        return 2
    sys.argv = [f"localopt {name}", *rest]
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
