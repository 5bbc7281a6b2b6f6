"""The wheel installs one top-level package, ``localopt`` (with ``localopt.models`` and
``localopt.recipes`` from the repository's ``models/`` and ``recipes/``), and its recipes run
from that install, outside the checkout."""
from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _packages_on_disk() -> set[str]:
    """Every Python package folder the wheel must ship, by its installed name."""
    roots = {"localopt": REPO / "localopt", "localopt.models": REPO / "models",
             "localopt.recipes": REPO / "recipes"}
    found = set()
    for name, root in roots.items():
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root).parts
            if "__pycache__" not in rel:
                found.add(".".join((name, *rel)))
    return found


def test_pyproject_lists_every_package():
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(cfg["packages"]) == _packages_on_disk()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", str(REPO), "-w", str(out)],
                   check=True, timeout=300, cwd=out)
    (whl,) = out.glob("localopt-*.whl")
    return whl


def test_wheel_installs_localopt_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"localopt"}
    assert "localopt/recipes/configs/main.toml" in names
    assert "localopt/models/resnet_cifar.py" in names
    entry = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "localopt = localopt.recipes.cli:main" in entry


def test_recipes_run_from_the_installed_wheel(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--target", str(site), str(wheel)], check=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = lambda code: subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                                      capture_output=True, text=True, timeout=120)
    r = run("import localopt, localopt.recipes.cli as c, localopt.models as m; "
            "print(localopt.__file__); print(m.create_model('mlp3x1024').__class__.__name__); "
            "c.main(['train', '--help'])")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith(str(site))
    assert "MLP" in r.stdout and "--rule" in r.stdout and "localopt train" in r.stdout
    r = run("import models")          # no top-level `models` (nor `recipes`) is installed
    assert r.returncode != 0 and "No module named 'models'" in r.stderr


def test_wheel_requires_torch_alone_and_offers_the_extras(wheel):
    """``pip install localopt`` pulls torch only; ``localopt[recipes]`` adds the model zoo's
    and the recipes' packages (the set a plain install pulled before)."""
    names = zipfile.ZipFile(wheel).namelist()
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines()
                if line.startswith("Requires-Dist:")]
    core = [r for r in requires if "extra ==" not in r]
    assert [r.split(">")[0].split("=")[0].split(";")[0].strip() for r in core] == ["torch"]
    recipes = {r.split(">")[0].strip() for r in requires if "extra == \"recipes\"" in r}
    assert {"torchvision", "timm", "numpy", "pillow", "tqdm", "matplotlib"} <= recipes
    extras = {line.split(":", 1)[1].strip() for line in meta.splitlines()
              if line.startswith("Provides-Extra:")}
    assert {"recipes", "tensorboard", "docs", "dev"} <= extras
    assert not any("einops" in r for r in requires)


def test_every_listed_recipe_command_has_a_main():
    """``localopt <recipe>`` lists the recipes that are commands, not the library modules."""
    import importlib
    from recipes.cli import commands
    listed = commands()
    assert {"train", "report", "pipeline", "benchmark"} <= set(listed)
    for name in listed:
        assert callable(getattr(importlib.import_module("recipes." + name.replace("-", "_")),
                                "main", None)), name
