"""Every rule under ``DistributedDataParallel`` (gloo, 2 processes on 127.0.0.1, one torch
thread each): weights and all ``localopt_*`` state stay identical on both ranks, and -- for
every rule whose step does not draw per-sample noise -- two DDP steps on two shards equal the
single-process steps on the concatenated batches.  The ranks start from different weights
and rule seeds: DDP's start-up broadcast (which carries each rule's ``localopt_rng`` stream)
must make them agree.  One spawn runs every rule; the whole test has a deadline."""
from __future__ import annotations

import json
import os
import sys
import warnings
from datetime import timedelta

import pytest
import torch

WORLD = 2
DEADLINE_S = 120
STEPS = 2
#: one DDP step equals the single-process step on the whole batch (float tolerance)
EXACT = ["bp", "fa", "usf", "brsf", "frsf", "kp", "wm", "bfa", "dfa", "bdfa", "drtp", "dkp",
         "bidfa", "bidfa-center", "bidfa-keep-mean", "bfa-keep-mean"]
#: cases that are a rule with options
OPTIONS = {"wm": ("wm", {"warmup": 1}), "bidfa-center": ("bidfa", {"center": True}),
           "bidfa-keep-mean": ("bidfa", {"drop_mean": False}),
           "bfa-keep-mean": ("bfa", {"drop_mean": False})}
#: per-sample noise of each rank's own shard: identical on the ranks, not equal to one process
NOISY = ["dtp", "sdtp", "ao-sdtp", "drl", "l-drl"]
#: (rule, DDP's forward_sync_buffers, how the optimizer finds the group); buffers are always
#: synced at start-up
CASES = ([(r, False, "ddp") for r in EXACT + NOISY]
         + [("brsf", True, "ddp"), ("dfa", True, "ddp"), ("dkp", True, "ddp"),
            ("bfa", False, "process_group"), ("l-drl", False, "process_group")])


def _model():
    from torch import nn
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 4))


def _optimizer(model, inner):
    import localopt
    from localopt.rules.target_prop import is_target_prop
    if is_target_prop(inner):
        return localopt.optim.TargetProp(model, torch.optim.SGD, lr=0.05, feedback_lr=0.01,
                                         noise=0.1)
    if localopt.sites(inner)[0].rule.learns_feedback:
        return localopt.optim.LocalOptimizer(model, torch.optim.SGD, lr=0.05, momentum=0.9,
                                             weight_decay=1e-3)
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def _build(rule: str, rank: int):
    """Rank-dependent weights and rule seed (``seed=None``: one draw of the global RNG)."""
    import localopt
    torch.manual_seed(100 + rank)
    name, options = OPTIONS.get(rule, (rule, {}))
    return localopt.wrap(_model(), name, **options)


def _batches():
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(WORLD * 5, 6, generator=g), torch.randint(0, 4, (WORLD * 5,),
                                                                    generator=g))
            for _ in range(STEPS)]


def _train(model, opt, batches) -> None:
    import torch.nn.functional as F
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _run_case(rule: str, forward_sync_buffers: bool, find: str, rank: int) -> dict:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from localopt.optim import LocalOptimizer, TargetProp

    model = _build(rule, rank)
    ddp = DDP(model, forward_sync_buffers=forward_sync_buffers)
    if find == "ddp":
        opt = _optimizer(ddp, model)
    else:  # the wrapped module itself, with the group named explicitly
        cls = TargetProp if rule in NOISY else LocalOptimizer
        kw = ({"feedback_lr": 0.01, "noise": 0.1} if cls is TargetProp
              else {"momentum": 0.9, "weight_decay": 1e-3})
        opt = cls(model, torch.optim.SGD, lr=0.05, process_group=dist.group.WORLD, **kw)
    n = WORLD * 5 // WORLD
    _train(ddp, opt, [(x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n])
                      for x, y in _batches()])
    mine = {k: v.detach().clone() for k, v in model.state_dict().items()}
    everyone = [None] * WORLD
    dist.all_gather_object(everyone, mine)
    out = {"case": [rule, forward_sync_buffers, find], "keys": sorted(mine),
           "differ_across_ranks": [k for k in mine if not all(
               torch.equal(everyone[r][k], mine[k]) for r in range(WORLD))]}
    if rank == 0:  # the same start as rank 0, one process, the concatenated batches
        ref = _build(rule, 0)
        _train(ref, _optimizer(ref, ref), _batches())
        ref_state = ref.state_dict()
        assert ref_state.keys() == mine.keys()
        out["max_diff_to_one_process"] = max(
            (ref_state[k].double() - mine[k].double()).abs().max().item()
            for k in mine if mine[k].numel())
    return out


def _worker() -> dict:
    """One rank (launched by localopt.pipeline.launch, which sets the env:// variables)."""
    rank = int(os.environ["RANK"])
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch.distributed as dist
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    results = {"cases": [_run_case(*case, rank) for case in CASES]}
    with warnings.catch_warnings(record=True) as caught:  # no DDP model, no group
        warnings.simplefilter("always")
        from localopt.optim import LocalOptimizer
        LocalOptimizer(_build("bfa", rank), torch.optim.SGD, lr=0.1)
    results["warned_without_group"] = [str(w.message) for w in caught]
    dist.barrier()
    dist.destroy_process_group()
    return json.loads(json.dumps(results))


@pytest.fixture(scope="module")
def ddp_results() -> dict:
    from localopt.pipeline import launch
    return launch(_worker, nprocs=WORLD, timeout=DEADLINE_S)[0]   # kills what still runs


def test_every_rule_keeps_weights_and_feedback_state_identical_across_ranks(ddp_results):
    assert [r["case"] for r in ddp_results["cases"]] == [list(c) for c in CASES]
    for r in ddp_results["cases"]:
        assert r["differ_across_ranks"] == [], r["case"]
        rule = OPTIONS.get(r["case"][0], (r["case"][0],))[0]   # a case label -> its rule
        if rule not in ("bp", "usf", "kp", "bfa", "fa", "frsf"):  # they draw after wrap
            assert any(k.endswith("localopt_rng") for k in r["keys"]), r["case"]


@pytest.mark.parametrize("rule", EXACT)
def test_ddp_step_equals_the_single_process_step_on_the_whole_batch(ddp_results, rule):
    for r in ddp_results["cases"]:
        if r["case"][0] == rule:
            assert r["max_diff_to_one_process"] < 1e-6, r


def test_optimizer_warns_when_ranks_run_but_no_group_is_known(ddp_results):
    (msg,) = ddp_results["warned_without_group"]
    assert "not averaged over the ranks" in msg and "process_group" in msg
