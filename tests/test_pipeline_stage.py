"""A stage per process (meta-device models materialised by module name), checkpoints in the plain
model's keys, the batch checks across ranks, autocast, and the torch-like step.  The
multi-process checks run in one spawn of two gloo processes on 127.0.0.1 (one torch thread
each); every wait has a timeout and launch() kills the processes when one fails."""
from __future__ import annotations

import io
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn.functional as F
from torch import nn

import localopt
from localopt import pipeline as lp
from localopt.models import create_model
from localopt.models.mlp import MLP

M = 4
SEED = 7
# MLP: 0 Flatten, 1 Linear, 2 Tanh, 3 Linear, 4 Tanh | 5 Linear, 6 Tanh, 7 Linear
META_CASES = [
    ("bp", "gpipe", ["5"], {}),
    ("fa", "1f1b", ["5"], {}),
    ("bp", "zb", ["3", "5", "7"], {}),
    ("dfa", "direct", ["5"], {}),
    ("dfa", "direct", ["5"], {"modules": ["5"]}),
]


class _Make:
    """A picklable model builder: the MLP (or ResNet-20), wrapped with ``rule``."""

    def __init__(self, rule: str, opts: dict | None = None, model: str = "mlp") -> None:
        self.rule, self.opts, self.model = rule, dict(opts or {}), model

    def __call__(self) -> nn.Module:
        if self.model == "resnet20":
            m = create_model("resnet20", num_classes=5)
        elif self.model == "wide":
            m = MLP(in_features=32, hidden=(32,) * 5, num_classes=32)
        else:
            m = MLP(in_features=12, hidden=(16, 16, 16), num_classes=5)
        if self.rule != "bp":
            localopt.wrap(m, self.rule, seed=1, **self.opts)
        return m


def _reference(make: _Make) -> nn.Module:
    """One process, the same values: the meta-device model materialised whole by name."""
    with torch.device("meta"):
        model = make()
    return lp.materialize(model, seed=SEED)


def _accumulate(model, opt, x, y) -> None:
    opt.zero_grad()
    for xm, ym in zip(x.split(x.shape[0] // M), y.split(y.shape[0] // M)):
        (F.cross_entropy(model(xm), ym) / M).backward()
    opt.step()


def _owned_diff(pipe, ref) -> float:
    part, rsd = pipe.state_dict()["model"], ref.state_dict()
    return max((part[k].float() - rsd[k].float()).abs().max().item()
               for k in part if part[k].numel() and k in rsd and rsd[k].numel())


def _data(shape=(12,), n=8):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, *shape, generator=g), torch.randint(0, 5, (n,), generator=g)


def _meta_cases(out):
    x, y = _data()
    for rule, schedule, split, opts in META_CASES:
        make = _Make(rule, opts)
        pipe = lp.build(make, split, schedule, microbatches=M, example=x[:1], seed=SEED,
                        timeout=30)
        opt = pipe.optimizer(torch.optim.SGD, lr=0.1, momentum=0.9)
        ref = _reference(make)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
        for _ in range(2):
            opt.zero_grad()
            pipe.step(x, y)
            opt.step()
            _accumulate(ref, ref_opt, x, y)
        out["meta"][(rule, schedule, str(opts))] = {
            "diff": _owned_diff(pipe, ref), "owned": len(pipe.state_dict()["model"]),
            "meta_params": sum(p.is_meta for p in pipe.model.parameters()),
            "memory": pipe.memory()}
    # the memory target: S = 2, largest parameter_bytes <= 0.6 x the model's
    xi, yi = _data((3, 8, 8))
    for name, split, schedule, rule, ex in (("wide", ["7"], "direct", "dfa", _data((32,))[0]),
                                            ("resnet20", ["layers.7"], "gpipe", "bp", xi)):
        make = _Make(rule, {}, name)
        pipe = lp.build(make, split, schedule, microbatches=M, example=ex[:1], seed=SEED,
                        timeout=30)
        opt = pipe.optimizer(torch.optim.SGD, lr=0.1)
        yy = yi if name == "resnet20" else \
            torch.randint(0, 32, (8,), generator=torch.Generator().manual_seed(0))
        ref = _reference(make)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
        opt.zero_grad()
        pipe.step(ex, yy)
        opt.step()
        _accumulate(ref, ref_opt, ex, yy)
        out["memory"][name] = dict(pipe.memory(), diff=_owned_diff(pipe, ref))


def _batch_checks(out):
    rank = int(os.environ["RANK"])
    x, y = _data()
    errors = {}
    for schedule, rule, split in (("direct", "drtp", ["5"]), ("gpipe", "bp", ["5"]),
                                  ("zb", "bp", ["3", "5", "7"])):
        pipe = lp.build(_Make(rule)(), split, schedule, microbatches=M, example=x[:1], timeout=30)
        got = {}
        for what, (xb, yb) in {
                "shuffled y": (x, y.flip(0) if rank == 1 else y),
                "other x": (x + rank, y),
                "batch size": ((x, y) if rank == 0 else (x[:4], y[:4])),
                "divisible": (x[:6], y[:6])}.items():
            try:
                pipe.step(xb, yb)
                got[what] = None
            except lp.PipelineError as exc:
                got[what] = str(exc)
        got["after"] = pipe.step(x, y) is not None or rank == 0   # still usable
        errors[schedule] = got
    out["batch"] = errors


AUTOCAST = (("dfa", "direct", ["5"]), ("bp", "gpipe", ["5"]), ("fa", "1f1b", ["5"]),
            ("bp", "zb", ["3", "5", "7"]))


def _autocast(out):
    x, y = _data()
    for rule, schedule, split in AUTOCAST:
        make = _Make(rule)
        torch.manual_seed(0)
        pipe = lp.build(make(), split, schedule, microbatches=M, example=x[:1], timeout=30)
        torch.manual_seed(0)
        ref = make()
        ref(x)                                   # dfa: draw its feedback, as build did
        opt = pipe.optimizer(torch.optim.SGD, lr=0.1)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = []
            for _ in range(2):
                opt.zero_grad()
                loss = pipe.step(x, target=y, losses=losses)
                opt.step()
                _accumulate(ref, ref_opt, x, y)
        out["autocast"][schedule] = {
            "loss": None if loss is None else float(loss), "losses": len(losses),
            "diff": _owned_diff(pipe, ref)}


def _checkpoints(out):
    x, y = _data()
    make = _Make("dfa")

    def fresh(split=("5",), schedule="direct", mk=make):
        pipe = lp.build(mk, list(split), schedule, microbatches=M, example=x[:1], seed=SEED,
                        timeout=30)
        return pipe, pipe.optimizer(torch.optim.Adam, lr=1e-2)

    def train(pipe, opt, steps=2):
        for _ in range(steps):
            opt.zero_grad()
            pipe.step(x, y)
            opt.step()

    pipe, opt = fresh()
    res = {"same_optimizer": pipe.optimizer(torch.optim.Adam, lr=1e-2) is opt,
           "made_optimizer": pipe.made_optimizer is opt,
           "stage_modules": [type(m).__name__ for m in pipe.stage_modules]}
    try:
        pipe.optimizer(torch.optim.SGD, lr=1e-2)
    except ValueError as exc:
        res["other_optimizer"] = str(exc)
    train(pipe, opt)
    buf = io.BytesIO()
    torch.save(pipe.state_dict(), buf)
    train(pipe, opt)
    after = {k: v.clone() for k, v in pipe.state_dict()["model"].items()}
    resumed, opt2 = fresh()
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf))
    train(resumed, opt2)
    res["resume_diff"] = max((after[k].float() - v.float()).abs().max().item()
                             for k, v in resumed.state_dict()["model"].items() if v.numel())
    full = pipe.gather_state_dict()
    logits = pipe.predict(x)
    if full is not None:                       # rank 0: the plain model loads it, strictly
        ref = _reference(make)
        ref.load_state_dict(full)
        with torch.no_grad():
            res["unsplit_logits"] = ref(x)
        res["full_keys"] = sorted(full) == sorted(ref.state_dict())
    res["logits"] = logits
    # a single-process checkpoint into a pipeline of another split
    ref = _reference(make)
    _accumulate(ref, torch.optim.SGD(ref.parameters(), lr=0.1), x, y)
    other, _ = fresh(split=("3",))
    other.load_state_dict(ref.state_dict())
    res["single_into_pipe"] = _owned_diff(other, ref)
    buf.seek(0)
    part = torch.load(buf)
    refused = {}
    for what, (mk, split, schedule) in {
            "split": (make, ("3",), "direct"),
            "rule": (_Make("fa"), ("5",), "1f1b"),
            "stages": (_Make("bp"), ("3", "5", "7"), "zb")}.items():
        target, _ = fresh(split, schedule, mk)
        before = {k: v.clone() for k, v in target.state_dict()["model"].items()}
        try:
            target.load_state_dict(part)
        except ValueError as exc:
            refused[what] = str(exc)
        refused[what + "_unchanged"] = all(
            torch.equal(before[k], v) for k, v in target.state_dict()["model"].items())
    try:
        pipe.load_state_dict({"0.weight": torch.zeros(1)})
    except ValueError as exc:
        refused["missing"] = str(exc)
    res["refused"] = refused
    out["checkpoint"] = res


def _worker():
    out = {"meta": {}, "memory": {}, "autocast": {}}
    _meta_cases(out)
    _batch_checks(out)
    _autocast(out)
    _checkpoints(out)
    return out


@pytest.fixture(scope="module")
def runs():
    return lp.launch(_worker, nprocs=2, timeout=240)


@pytest.mark.parametrize("case", META_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{len(c[3])}")
def test_meta_model_each_rank_materialises_its_stage_with_single_process_values(runs, case):
    rule, schedule, split, opts = case
    for rank, res in enumerate(runs):
        r = res["meta"][(rule, schedule, str(opts))]
        assert r["owned"] > 0 and r["diff"] < 1e-5, (rank, r)
        assert r["meta_params"] > 0, r                # the other stage(s): never materialised
        assert r["memory"]["parameter_bytes"] < r["memory"]["model_parameter_bytes"], r


@pytest.mark.parametrize("model", ["wide", "resnet20"])
def test_each_process_holds_at_most_0_6_of_the_model(runs, model):
    for res in runs:
        mem = res["memory"][model]
        assert mem["diff"] < 1e-5, mem
        assert mem["parameter_bytes"] <= 0.6 * mem["model_parameter_bytes"], mem
        assert mem["state_bytes"] > mem["parameter_bytes"], mem


@pytest.mark.parametrize("schedule", ["direct", "gpipe", "zb"])
def test_ranks_that_disagree_on_the_batch_are_named_on_every_rank(runs, schedule):
    for rank, res in enumerate(runs):
        got = res["batch"][schedule]
        assert "rank 1's y differs from rank 0's" in got["shuffled y"], got
        assert "rank 1's x differs from rank 0's" in got["other x"], got
        assert "rank 1's x has 4 rows, rank 0's x 8" in got["batch size"], got
        assert "does not divide into microbatches=4" in got["divisible"], got
        assert got["after"], got


@pytest.mark.parametrize("schedule", [c[1] for c in AUTOCAST])
def test_bf16_autocast_trains_as_one_process(runs, schedule):
    for rank, res in enumerate(runs):
        r = res["autocast"][schedule]
        assert r["diff"] < 2e-2, (rank, r)
        if rank == 1:
            assert r["loss"] is not None and r["loss"] == r["loss"] and r["losses"] == 2 * M, r
        else:
            assert r["loss"] is None and r["losses"] == 0, r


def test_one_optimizer_per_pipeline(runs):
    for res in runs:
        c = res["checkpoint"]
        assert c["same_optimizer"] and "already has its optimizer" in c["other_optimizer"]
        assert c["made_optimizer"] and len(c["stage_modules"]) == 1


def test_checkpoint_resumes_bit_exactly_and_loads_into_the_unsplit_model(runs):
    r0, r1 = (res["checkpoint"] for res in runs)
    assert r0["resume_diff"] == 0.0 and r1["resume_diff"] == 0.0
    assert r0["full_keys"]
    assert r1["logits"] is not None and r0["logits"] is None
    assert torch.allclose(r0["unsplit_logits"], r1["logits"], atol=1e-6)
    assert r0["single_into_pipe"] == 0.0 and r1["single_into_pipe"] == 0.0


def test_checkpoint_of_another_set_up_is_refused_unchanged(runs):
    for res in runs:
        ref = res["checkpoint"]["refused"]
        assert "split: checkpoint ['5'], this pipeline ['3']" in ref["split"], ref
        assert "rule: checkpoint 'dfa', this pipeline 'fa'" in ref["rule"], ref
        assert "stages: checkpoint 2, this pipeline 4" in ref["stages"], ref
        assert "lacks" in ref["missing"], ref
        assert ref["split_unchanged"] and ref["rule_unchanged"] and ref["stages_unchanged"]


# -- in one process: errors raised before any communication -----------------------------------
def test_a_parameter_in_no_stage_is_named():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls_token = nn.Parameter(torch.zeros(1, 4))
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(self.a(x + self.cls_token))

        def pipeline_sequence(self):
            return [("a", self.a), ("b", self.b)]

    with pytest.raises(ValueError, match=r"\['cls_token'\] of this Tokens belong to no stage"):
        lp.build(Tokens(), ["b"], "gpipe", example=torch.zeros(1, 4))


def test_a_compiled_model_is_refused_naming_the_route():
    model = MLP(in_features=12, hidden=(16,), num_classes=5)
    with pytest.raises(TypeError, match=r"pipe.module.compile\(\)"):
        lp.build(torch.compile(model), ["3"], "gpipe", example=torch.zeros(1, 12))


def test_a_meta_model_needs_a_seed():
    with torch.device("meta"):
        model = MLP(in_features=12, hidden=(16,), num_classes=5)
    with pytest.raises(ValueError, match="seed="):
        lp.build(model, ["3"], "gpipe", example=torch.zeros(1, 12))


def test_materialize_names_what_no_reset_parameters_draws():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls_token = nn.Parameter(torch.zeros(1, 4))
            self.a = nn.Linear(4, 4)

    with torch.device("meta"):
        model = Tokens()
    with pytest.raises(ValueError, match=r"'\(root\)' \(Tokens: cls_token\).*init="):
        lp.materialize(model, seed=0)
    assert model.a.weight.is_meta                    # nothing changed
    lp.materialize(model, seed=0, init=lambda name, m: (
        nn.init.normal_(m.cls_token) if name == "" else m.reset_parameters()))
    a = model.a.weight.clone()
    with torch.device("meta"):
        again = Tokens()
    lp.materialize(again, seed=0, modules=[("a", again.a)])   # by name: the same values alone
    assert torch.equal(again.a.weight, a) and again.cls_token.is_meta


def test_blocks_selects_every_block_whatever_the_depth():
    assert lp.blocks(create_model("resnet32")) == [f"layers.{i}" for i in range(15)]
    model = create_model("resnet32")
    localopt.wrap(model, "dfa", modules=lp.blocks(model), seed=0)
    assert len(localopt.sites(model)) == 15
    with pytest.raises(ValueError, match="no container of repeated blocks"):
        lp.blocks(nn.Sequential(nn.Linear(2, 2), nn.Tanh()))


def test_launch_under_a_launcher_with_another_size_fails_at_once(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(RuntimeError, match="WORLD_SIZE=3, but launch\\(nprocs=2\\)"):
        lp.launch(_worker, nprocs=2)


def test_a_failed_transfer_says_when_it_failed_not_the_timeout():
    from datetime import timedelta

    from localopt.pipeline.comm import Link
    from localopt.pipeline.events import Recorder

    class Broken:
        def wait(self, timeout):
            raise RuntimeError("Connection closed by peer")

    link = Link.__new__(Link)          # no process group needed to word the error
    link.rank, link.timeout, link.rec = 0, timedelta(seconds=60), Recorder(False)
    with pytest.raises(lp.PipelineError, match=r"from rank 1 \(the transfer failed after 0\.\d s\)"
                       ) as info:
        link.wait((Broken(), None, 1, "recv"), 0, 0, "an activation")
    assert "within 60 s" not in str(info.value)


class _RootBias(nn.Module):
    """Traced (no sequence): stage 0 reads the root's own ``bias`` (as a ViT its cls_token)."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(4))
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(self.a(x) + self.bias)


def test_meta_set_ups_that_cannot_be_materialised_fail_before_any_communication(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match=r"stage 0 reads \['bias'\] of the model directly"):
        lp.build(_RootBias, ["b"], "gpipe", example=torch.zeros(1, 4), seed=0)

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gamma = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.gamma

    def make():
        return nn.Sequential(nn.Linear(4, 4), Scale(), nn.Linear(4, 2))

    with pytest.raises(ValueError, match=r"'1' \(Scale: gamma\).*init="):
        lp.build(make, ["2"], "gpipe", example=torch.zeros(1, 4), seed=0)
    with pytest.raises(lp.PipelineError, match="torchrun"):      # with init=: the group is next
        lp.build(make, ["2"], "gpipe", example=torch.zeros(1, 4), seed=0,
                 init=lambda name, m: nn.init.ones_(m.gamma) if name == "1" else
                 m.reset_parameters())


@settings(max_examples=30, deadline=None)
@given(st.permutations(list(range(6))))
def test_the_batch_checksum_changes_when_samples_move(order):
    from localopt.pipeline.batch import checksum
    x = torch.arange(6 * 4, dtype=torch.float32).reshape(6, 4)     # distinct samples
    moved = x[list(order)]
    assert (checksum(moved) == checksum(x)) == (list(order) == list(range(6)))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.sampled_from([8, 4]), st.sampled_from([1.0, 2.0]),
                          st.booleans(), st.sampled_from([1.0, 3.0])), min_size=2, max_size=4))
def test_the_batch_headers_are_refused_exactly_when_the_ranks_disagree(ranks):
    """Rank 0 always has x; the headers agree iff every given x and y has rank 0's rows and
    the same checksum as the first one given."""
    from localopt.pipeline.batch import check_headers
    ranks[0] = (True,) + ranks[0][1:]
    h = [[float(hx), n, cx, float(hy), n, cy, 0.0] for hx, n, cx, hy, cy in ranks]
    xs = [(r[1], r[2]) for r in ranks if r[0]]
    ys = [(r[1], r[4]) for r in ranks if r[3]]
    agree = all(v == xs[0] for v in xs) and all(v == (xs[0][0], ys[0][1]) for v in ys)
    if agree and xs[0][0] % 4 == 0:
        assert check_headers(h, 4) == xs[0][0]
    else:
        with pytest.raises(lp.PipelineError, match="rank|divide"):
            check_headers(h, 4)
