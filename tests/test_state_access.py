"""The public view of a model's wrapping (``localopt.wrapping``) and the hooks-off flag
(``localopt.hooks_disabled``)."""
from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import localopt
from localopt.mechanism import site_of

torch.set_num_threads(1)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                         nn.Linear(8, 3))


def blocks(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8)), nn.Tanh(),
                         nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)))


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def grads(model, x, y):
    """Gradients of the parameters and of the input for one cross-entropy batch."""
    x = x.clone().requires_grad_()
    loss = F.cross_entropy(model(x), y)
    params = [p for _, p in model.named_parameters()]
    return torch.autograd.grad(loss, params + [x], allow_unused=True)  # dtp: x gets none


def same(a, b):
    return all(u is v is None or (u is not None and v is not None and torch.equal(u, v))
               for u, v in zip(a, b))


# ----------------------------------------------------------------------------- wrapping()
def test_wrapping_is_none_for_a_plain_model_and_after_unwrap():
    m = mlp()
    assert localopt.wrapping(m) is None
    localopt.wrap(m, "fa", seed=0)
    assert localopt.wrapping(m) is not None
    localopt.unwrap(m)
    assert localopt.wrapping(m) is None


def test_wrapping_names_the_rule_sites_options_and_kept_layers():
    m = nn.Sequential(nn.Linear(4, 4), nn.MultiheadAttention(4, 2), nn.Linear(4, 2))
    localopt.wrap(m, "fa", unsupported="bp", seed=0, init="uniform", match_norm=True)
    w = localopt.wrapping(m)
    assert isinstance(w, localopt.Wrapping)
    assert w.rule.name == "fa" and isinstance(w.rule, localopt.FeedbackRule)
    assert w.sites == tuple(localopt.sites(m))
    assert [s.module for s in w.sites] == [m[0], m[2]]
    assert all(site_of(s.module) is s and s.rule is w.rule for s in w.sites)
    assert w.kept_bp == (("1", "MultiheadAttention"),)
    assert w.options["init"] == "uniform" and w.options["match_norm"] is True
    assert w.options == w.rule.options()


def test_wrapping_is_a_read_only_snapshot():
    m = mlp()
    localopt.wrap(m, "fa", seed=0)
    w = localopt.wrapping(m)
    with pytest.raises(dataclasses.FrozenInstanceError):
        w.rule = None
    localopt.unwrap(m)
    localopt.wrap(m, "dfa", seed=0)
    assert w.rule.name == "fa" and localopt.wrapping(m).rule.name == "dfa"


def test_site_of_is_none_off_the_hooked_modules():
    m = mlp()
    assert all(site_of(mod) is None for mod in m.modules())
    localopt.wrap(m, "fa", seed=0)
    assert site_of(m) is None and site_of(m[1]) is None
    localopt.unwrap(m)
    assert all(site_of(mod) is None for mod in m.modules())


# ----------------------------------------------------------------------------- hooks_disabled()
CASES = {
    "fa": (mlp, {}),
    "usf": (mlp, {}),
    "brsf": (mlp, {}),
    "dfa": (mlp, {}),
    "dfa-modules-inside-fa": (blocks, {"modules": ["0", "2"], "inside": "fa"}),
    "dtp": (mlp, {}),
}


@pytest.mark.parametrize("case", CASES)
def test_hooks_disabled_gives_exact_backprop_and_restores_the_rule(case):
    make, opts = CASES[case]
    rule = case.split("-")[0]
    x, y = batch()
    plain = make()
    bp = grads(plain, x, y)
    m = localopt.wrap(make(), rule, seed=0, **opts)
    rule_grads = grads(m, x, y)
    assert not same(rule_grads, bp)  # the rule changes the signal: the check below can fail
    with localopt.hooks_disabled(m) as inside:
        assert inside is m
        off = grads(m, x, y)
        out = m(x)
    assert None not in off and same(off, bp)
    assert torch.equal(out, plain(x))
    again = grads(m, x, y)  # the rule is back, as it was
    if rule == "brsf":  # a new B at every forward
        assert not same(again, bp)
    else:
        assert same(again, rule_grads)


def test_hooks_disabled_keeps_the_users_hooks_and_their_order():
    m = localopt.wrap(mlp(), "fa", seed=0)
    calls = []
    m[2].register_forward_hook(lambda mod, a, out: calls.append("user") or None)
    order = [list(mod._forward_hooks) for mod in m.modules()]
    x, y = batch()
    with localopt.hooks_disabled(m):
        grads(m, x, y)
    assert calls == ["user"]
    assert [list(mod._forward_hooks) for mod in m.modules()] == order


def test_hooks_disabled_nests_and_restores_after_an_error():
    m = localopt.wrap(mlp(), "dfa", seed=0)
    x, y = batch()
    ref = grads(m, x, y)
    with pytest.raises(KeyError):
        with localopt.hooks_disabled(m):
            with localopt.hooks_disabled(m):
                pass
            assert not localopt.wrapping(m).rule.hooks_enabled
            assert not any(s.active for s in localopt.sites(m))
            raise KeyError("boom")
    assert localopt.wrapping(m).rule.hooks_enabled
    assert all(s.active for s in localopt.sites(m))
    assert same(grads(m, x, y), ref)


def test_hooks_disabled_refuses_a_plain_model():
    with pytest.raises(ValueError, match="not wrapped"):
        with localopt.hooks_disabled(mlp()):
            pass


def test_update_angles_leave_the_model_as_it_was():
    m = localopt.wrap(mlp(), "fa", seed=0)
    x, y = batch()
    ref = grads(m, x, y)
    angles = localopt.diagnostics.update_angles(m, F.cross_entropy, x, y)
    assert set(angles) == {"0", "2", "4"}
    assert angles["4"] == pytest.approx(0.0, abs=1e-4)  # the top layer gets the true error
    assert angles["0"] > 1.0
    assert same(grads(m, x, y), ref)


HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
              "_state_dict_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def hook_keys(model):
    return [[list(getattr(mod, d)) for d in HOOK_DICTS] for mod in model.modules()]


@pytest.mark.parametrize("rule", ["fa", "dfa", "kp", "dtp"])
def test_unwrap_removes_every_hook_it_added_also_from_a_deepcopy(rule):
    m = mlp()
    m[2].register_forward_hook(lambda mod, a, out: None)  # the user's: stays
    before = hook_keys(m)
    localopt.wrap(m, rule, seed=0)
    assert hook_keys(m) != before
    c = copy.deepcopy(m)
    for model in (m, c):  # the copy's handles name the copy's hook dicts
        localopt.unwrap(model)
        assert hook_keys(model) == before


# ----------------------------------------------------------------------------- pending feedback
def test_update_angles_leave_the_pending_least_squares_normaliser():
    m = localopt.wrap(mlp(), "bfa", seed=0)
    opt = localopt.optim.LocalOptimizer(m, torch.optim.SGD, lr=0.1)
    x, y = batch()
    opt.zero_grad()
    F.cross_entropy(m(x), y).backward()
    norms = [s.feedback_norm for s in localopt.sites(m)]
    assert any(n is not None for n in norms)
    kept = [None if n is None else n.clone() for n in norms]
    localopt.diagnostics.update_angles(m, F.cross_entropy, x, y)
    for s, n, k in zip(localopt.sites(m), norms, kept):
        assert s.feedback_norm is n
        assert n is None or torch.equal(n, k)


def test_update_angles_leave_target_propagation_traces():
    from localopt.optim import TargetProp
    from localopt.rules.target_prop import last_targets
    x, y = batch()
    runs = []
    for diagnose in (False, True):
        m = localopt.wrap(mlp(), "dtp", seed=0)
        opt = TargetProp(m, torch.optim.SGD, lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            if diagnose:
                targets = last_targets(m)
                localopt.diagnostics.update_angles(m, F.cross_entropy, x, y)
                assert all(a is b for a, b in zip(last_targets(m), targets))
            opt.step()
        runs.append(m.state_dict())
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k


# ----------------------------------------------------------------------------- declared state
def _train(rule):
    if rule == "dfa-inside":  # a rule that hooks layers inside its modules itself
        m = localopt.wrap(blocks(), "dfa", seed=0, modules=["0", "2"], inside="fa")
    else:
        m = localopt.wrap(mlp(), rule, seed=0)
    r = localopt.wrapping(m).rule
    if r.name in ("dtp", "sdtp", "ao-sdtp", "drl", "l-drl"):
        opt = localopt.optim.TargetProp(m, torch.optim.SGD, lr=0.05)
    else:
        opt = localopt.optim.LocalOptimizer(m, torch.optim.SGD, lr=0.05)
    x, y = batch()
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    localopt.diagnostics.update_angles(m, F.cross_entropy, x, y)
    return m


@pytest.mark.parametrize("rule", localopt.available_rules() + ["dfa-inside"])
def test_rules_set_only_the_declared_site_state(rule):
    """Every attribute of a site after training is set by Site itself or declared on it."""
    own = set(vars(localopt.Site(nn.Linear(1, 1), "x", None)))
    declared = {k for k in vars(localopt.Site) if not k.startswith("__")}
    m = _train(rule)
    hooked = [s for s in map(site_of, m.modules()) if s is not None]
    assert hooked
    for s in hooked:
        assert set(vars(s)) <= own | declared, (s, set(vars(s)) - own - declared)


# ----------------------------------------------------------------------------- capabilities
def test_feedback_scale_check_follows_the_declared_capabilities():
    class Huge(localopt.FeedbackRule):
        name = "huge-test-only"

        def feedback(self, site):
            return site.weight.detach() * 1e3

    class Exact(Huge):
        computes_true_gradient = True

    class Redrawn(Huge):
        redraws_feedback = True

    import warnings
    for cls, warns in ((Huge, True), (Exact, False), (Redrawn, False)):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            localopt.wrap(mlp(), cls(), seed=0)
        assert any("explode" in str(x.message) for x in w) == warns, cls.__name__


# ------------------------------------------------------------------ torch's private state
#: torch.nn.Module's private dictionaries and the conv modules' private padding: localopt goes
#: through the public API (register_buffer, named_buffers, attribute access, delattr) instead
PRIVATE_TORCH = re.compile(r"\._(buffers|parameters|modules|non_persistent_buffers_set|"
                           r"(forward|backward)(_pre)?_hooks|reversed_padding_repeated_twice)\b")


def test_the_library_uses_no_private_state_of_torch_modules():
    root = Path(localopt.__file__).parent
    found = [f"{p.relative_to(root)}:{i}: {line.strip()}"
             for p in sorted(root.rglob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1)
             if PRIVATE_TORCH.search(line)]
    assert not found, found


#: ``obj._attr`` with ``obj`` not self/cls: a private attribute read or written through another
#: object.  A module may do that only with the private attributes it defines itself (``self._x``
#: or a class-level ``_x`` in the same file: the owner's own helpers).  Of torch, allowed:
#: ``torch._foreach_*`` and ``torch._assert_async`` (the fused ops torch.optim uses),
#: ``Tensor._version``/``._base`` (in-place and view tracking), torch's private modules
#: imported by name, and the two send/recv functions of torch's pipeline schedules that
#: ``localopt.pipeline.backprop`` times (looked up with getattr, so a torch without them runs).
OTHERS_PRIVATE = re.compile(r"\b(?!self\b|cls\b)[A-Za-z_][A-Za-z0-9_]*\.(_[a-z][a-z0-9_]*)\b")
TORCH_PRIVATE = re.compile(r"torch\._foreach_\w+|torch\._assert_async|\._version\b|\._base\b|"
                           r"torch\.optim\._muon|pipelining\._schedule_visualizer|"
                           r"schedules\._(wait_)?batch_p2p|sys\._getframe")


def test_no_module_of_the_library_uses_another_modules_private_attributes():
    root = Path(localopt.__file__).parent
    found = []
    for p in sorted(root.rglob("*.py")):
        text = p.read_text()
        own = set(re.findall(r"(?:self\.|^\s+)(_[a-z][a-z0-9_]*)\s*[:=]", text, re.M))
        for i, line in enumerate(text.splitlines(), 1):
            code = TORCH_PRIVATE.sub("", line.split("#")[0])
            found += [f"{p.relative_to(root)}:{i}: {line.strip()}"
                      for name in OTHERS_PRIVATE.findall(code) if name not in own]
    assert not found, found


def test_unwrap_removes_the_state_and_set_buffer_replaces_it_in_place_of_the_old():
    m = mlp()
    plain = {k for k, _ in m.named_buffers()}
    localopt.wrap(m, "fa", seed=0)
    site = site_of(m[0])
    B = site.buffer("feedback")
    assert site.has_buffer("feedback") and not site.has_buffer("nothing")
    site.set_buffer("feedback", B.clone().zero_())
    assert not torch.equal(site.buffer("feedback"), B)
    assert torch.equal(m.state_dict()["0.localopt_feedback"], site.buffer("feedback"))
    with pytest.raises(KeyError, match="no buffer 'nothing'"):
        site.set_buffer("nothing", B)
    localopt.unwrap(m)
    assert {k for k, _ in m.named_buffers()} == plain
    assert not hasattr(m[0], "localopt_feedback")
