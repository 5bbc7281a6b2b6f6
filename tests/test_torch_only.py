"""``localopt`` (the core and the pipeline) needs torch alone: in a process where the recipes'
packages (torchvision, timm, numpy, PIL, matplotlib, tqdm, ...) cannot be imported, the package
imports, every registered rule wraps a model and trains a step with the optimizer it needs,
and ``localopt.pipeline`` imports.  ``pip install localopt`` installs exactly that."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: what the recipes extra (and the test tools) bring; none of it may be needed by the library
BLOCKED = ("torchvision", "timm", "numpy", "PIL", "matplotlib", "tqdm", "einops", "lightning",
           "pytorch_lightning", "tensorboard", "models", "recipes")

SCRIPT = r'''
import importlib.util
import sys

BLOCKED = sys.argv[1].split(",")
for name in BLOCKED:                        # the view really lacks them
    assert importlib.util.find_spec(name) is None, name

import torch
import torch.nn.functional as F
from torch import nn

torch.set_num_threads(1)
import localopt
import localopt.pipeline
from localopt.optim import LocalOptimizer, TargetProp
from localopt.pipeline import timeline  # noqa: F401  (drawing imports matplotlib lazily)
from localopt.rules import get_rule
from localopt.rules.target_prop import TargetPropRule

rules = localopt.available_rules()
assert len(rules) >= 18, rules
for rule in rules:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                          nn.Linear(16, 4))
    before = [p.detach().clone() for p in model.parameters()]
    localopt.wrap(model, rule, seed=0)
    cls = get_rule(rule)
    if issubclass(cls, TargetPropRule):
        opt = TargetProp(model, torch.optim.SGD, lr=0.1, feedback_lr=0.01, noise=0.05)
    elif cls.learns_feedback:
        opt = LocalOptimizer(model, torch.optim.SGD, lr=0.1)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 12), torch.randint(0, 4, (8,))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    moved = [not torch.equal(a, p) for a, p in zip(before, model.parameters())]
    assert any(moved), rule
    localopt.unwrap(model)
blocked_loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not blocked_loaded, blocked_loaded
print("ok", len(rules))
'''


def _site_without(blocked: tuple[str, ...], dest: Path) -> Path:
    """A view of this interpreter's site-packages (links) without the ``blocked`` packages,
    their metadata and any ``.pth`` file (so no editable install points elsewhere)."""
    import site
    dest.mkdir()
    lowered = {b.lower() for b in blocked}
    for root in map(Path, site.getsitepackages()):
        for entry in root.iterdir():
            top = entry.name.split("-")[0].split(".")[0].lower()
            if top in lowered or top.replace("_", "") in lowered or entry.suffix == ".pth" \
                    or entry.name.startswith("__editable__") or (dest / entry.name).exists():
                continue
            (dest / entry.name).symlink_to(entry)
    return dest


def test_localopt_needs_torch_alone(tmp_path):
    site = _site_without(BLOCKED + ("pillow",), tmp_path / "site")
    (tmp_path / "src").mkdir()                 # the library alone, not the checkout's
    (tmp_path / "src" / "localopt").symlink_to(REPO / "localopt")   # models/ and recipes/
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "src"), str(site)]),
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-S", "-c", SCRIPT, ",".join(BLOCKED)], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.startswith("ok "), r.stdout

