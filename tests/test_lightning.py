"""A wrapped timm model trains with LocalOptimizer inside PyTorch Lightning's Trainer
(``examples/lightning_timm.py``: CPU, random images, a few steps)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")
pytest.importorskip("timm")

import localopt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _example():
    spec = importlib.util.spec_from_file_location("lightning_timm",
                                                  REPO / "examples" / "lightning_timm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_timm_model_trains_with_local_optimizer_in_lightning(monkeypatch):
    ex = _example()
    built = {}
    real_init = ex.LocalRuleModule.__init__

    def init(self, model, *args, **kwargs):       # the model's weights and feedback at start
        real_init(self, model, *args, **kwargs)
        built["state"] = {k: v.clone() for k, v in self.model.state_dict().items()}

    monkeypatch.setattr(ex.LocalRuleModule, "__init__", init)
    module = ex.main(max_steps=3, rule="kp")
    assert module.trainer.global_step == 3
    assert localopt.is_wrapped(module.model)
    opt = module.trainer.optimizers[0]
    assert isinstance(opt, localopt.optim.LocalOptimizer)
    assert isinstance(opt, torch.optim.SGD)
    after = module.model.state_dict()
    feedback = [k for k in after if "localopt" in k and after[k].is_floating_point()
                and after[k].shape == built["state"][k].shape and after[k].dim() > 1]
    assert feedback, "kp keeps its feedback in localopt_* buffers"
    # Kolen-Pollack's B receives W's update: Lightning's optimizer.step(closure) trained it
    assert any(not torch.equal(after[k], built["state"][k]) for k in feedback)
    assert not torch.equal(after["conv1.weight"], built["state"]["conv1.weight"])
    assert "fc" not in {s.name for s in localopt.sites(module.model)}   # exclude="fc"
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
