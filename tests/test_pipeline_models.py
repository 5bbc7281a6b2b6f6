"""Models that are not a sequence of modules, pipelined through their traced forward: timm's and
torchvision's ResNet-18 and a timm ViT, on GPipe (``bp``) and on the direct schedule
(module-wise ``dfa`` over every block), each step compared with the single-process step with
gradient accumulation.  Two gloo processes on 127.0.0.1, one torch thread each."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn.functional as F
from torch import nn

import localopt
from localopt import pipeline as lp

M = 2
MODELS = {   # name: (split point, input size)
    "timm_resnet18": ("layer3.0", 16),
    "tv_resnet18": ("layer3.0", 16),
    "timm_vit": ("blocks.6", 32),
}
RULES = (("bp", "gpipe"), ("dfa", "direct"))


def _make(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "tv_resnet18":
        import torchvision
        return torchvision.models.resnet18(num_classes=5)
    import timm
    if name == "timm_vit":
        return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4,
                                 num_classes=5)
    return timm.create_model("resnet18", num_classes=5)


def _worker():
    out = {}
    for name, (split, size) in MODELS.items():
        g = torch.Generator().manual_seed(3)
        x = torch.randn(4, 3, size, size, generator=g)
        y = torch.randint(0, 5, (4,), generator=g)
        for rule, schedule in RULES:
            model, ref = _make(name), _make(name)
            for m in (model, ref):
                if rule == "dfa":
                    localopt.wrap(m, "dfa", modules=lp.blocks(m), seed=1)
            pipe = lp.build(model, [split], schedule, microbatches=M, example=x[:1], timeout=60)
            if rule == "dfa":      # draw the reference's feedback as build's shape pass did
                ref.eval()
                ref(x[:1])
                ref.train()
            opt = pipe.optimizer(torch.optim.SGD, lr=0.1)
            ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
            opt.zero_grad()
            loss = pipe.step(x, y)
            opt.step()
            ref_opt.zero_grad()
            for xm, ym in zip(x.split(len(x) // M), y.split(len(y) // M)):
                (F.cross_entropy(ref(xm), ym) / M).backward()
            ref_opt.step()
            part, rsd, init = pipe.state_dict()["model"], ref.state_dict(), _make(name)
            weights = [k for k in part if k.endswith("weight") and "localopt" not in k]
            out[(name, rule)] = {
                "keys": len(part), "loss": None if loss is None else float(loss),
                "diff": max((part[k].float() - rsd[k].float()).abs().max().item()
                            for k in part if part[k].numel()),
                "moved": max((part[k] - init.state_dict()[k]).abs().max().item()
                             for k in weights)}
    return out


@pytest.fixture(scope="module")
def runs():
    return lp.launch(_worker, nprocs=2, timeout=400)


@pytest.mark.parametrize("rule", [r for r, _ in RULES])
@pytest.mark.parametrize("name", list(MODELS))
def test_traced_model_step_equals_single_process_accumulation(runs, name, rule):
    for rank, res in enumerate(runs):
        r = res[(name, rule)]
        assert r["keys"] > 10 and r["moved"] > 1e-4 and r["diff"] < 1e-5, (rank, r)
        assert (r["loss"] is not None) == (rank == 1), r
    assert runs[0][(name, rule)]["keys"] + runs[1][(name, rule)]["keys"] >= \
        len(_make(name).state_dict())


# -- in one process: traced splits that are refused ------------------------------------------
class Skip(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.c(self.b(self.a(x)) + x)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 2)

    def forward(self, x):
        return self.a(x) if x.sum() > 0 else -self.a(x)


def test_traced_split_points_cut_where_a_single_value_crosses():
    with pytest.raises(ValueError, match=r"needs \['x'\] from an earlier stage"):
        lp.split_stages(Skip(), ["b"])
    with pytest.raises(ValueError, match=r"names no module that the forward.*\['a', 'b', 'c'\]"):
        lp.split_stages(Skip(), ["d"])
    with pytest.raises(ValueError, match="stage 0 would be empty"):
        lp.split_stages(Skip(), ["a"])


def test_traced_stages_compose_to_the_model():
    torch.manual_seed(0)
    model = Skip()
    stages = lp.split_stages(model, ["c"])
    x = torch.randn(3, 4)
    assert torch.equal(stages[1](stages[0](x)), model(x))
    assert {id(p) for st in stages for p in st.parameters()} == {id(p) for p in model.parameters()}


def test_a_model_that_cannot_be_traced_is_named():
    with pytest.raises(TypeError, match="Branchy.*torch.fx cannot trace"):
        lp.split_stages(Branchy(), ["a"])


class _Chain(nn.Module):
    """A forward that is a chain of calls with functional glue: traced, not a Sequential."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 5), nn.Linear(5, 5), nn.Linear(5, 4)
        self.d, self.e = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x.flatten(1)))
        h = self.c(torch.relu(self.b(h)) * 2)
        return self.e(torch.sigmoid(self.d(h)) + 1)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.sampled_from(["b", "c", "d", "e"]), unique=True, max_size=4))
def test_any_ordered_traced_split_composes_and_partitions_the_parameters(cut):
    torch.manual_seed(0)
    model = _Chain()
    split = sorted(cut)                    # the forward calls a, b, c, d, e in this order
    stages = lp.split_stages(model, split)
    assert len(stages) == len(split) + 1
    x = torch.randn(3, 2, 3)
    h = x
    for stage in stages:
        h = stage(h)
    assert torch.equal(h, model(x))
    owned = [{id(p) for p in stage.parameters()} for stage in stages]
    assert sum(map(len, owned)) == len(list(model.parameters()))
    assert set().union(*owned) == {id(p) for p in model.parameters()}
