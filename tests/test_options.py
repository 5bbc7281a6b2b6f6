"""Bad options are clear errors naming the option, and leave the model untouched; misuse of
the optimizers is reported; feedback that would explode is warned about."""
from __future__ import annotations

import inspect
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import localopt
from localopt.optim import LocalOptimizer, TargetProp
from localopt.rules import get_rule

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def fingerprint(model: nn.Module):
    """Everything wrap could touch: state, hooks, attributes."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = [(n, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._state_dict_hooks),
              len(m._load_state_dict_pre_hooks), len(m._load_state_dict_post_hooks),
              sorted(k for k in m.__dict__ if "localopt" in k)) for n, m in model.named_modules()]
    return state, hooks


def unchanged(model, before) -> bool:
    state, hooks = fingerprint(model)
    return (hooks == before[1] and state.keys() == before[0].keys()
            and all(torch.equal(state[k], before[0][k]) for k in state))


def numeric_options() -> list[tuple[str, str, bool]]:
    """(rule, option, integer) for every numeric option of every rule's constructor."""
    out = []
    for rule in localopt.available_rules():
        for name, p in inspect.signature(get_rule(rule).__init__).parameters.items():
            d = p.default
            if (isinstance(d, (int, float)) and not isinstance(d, bool)) or (rule, name) in (
                    ("wm", "decay"), ("usf", "scale")):  # defaults None / "xavier"
                out.append((rule, name, isinstance(d, int) and not isinstance(d, bool)))
    return out


NUMERIC = numeric_options()
# values no numeric option accepts (every one is >= 0, finite, and a real number)
BAD = st.one_of(st.sampled_from([math.nan, math.inf, -math.inf, "1", [1], True, None, object()]),
                st.floats(max_value=-1e-3, allow_nan=False, allow_infinity=False),
                st.integers(max_value=-1))


def test_every_rule_option_kind_is_covered():
    names = {(r, o) for r, o, _ in NUMERIC}
    assert {("usf", "scale"), ("dfa", "scale"), ("dfa", "max_feedback_mb"), ("wm", "samples"),
            ("wm", "decay"), ("bfa", "lr"), ("dtp", "beta"), ("ao-sdtp", "aux_units"),
            ("bidfa", "lr")} <= names


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.sampled_from(NUMERIC), value=BAD, fractional=st.booleans())
def test_bad_numeric_options_raise_naming_the_option(which, value, fractional):
    rule, option, integer = which
    if integer and fractional:
        value = 1.5  # an int option given a fraction
    elif value is None and (rule, option) == ("wm", "decay"):
        value = -0.5  # None is wm's default decay
    model = mlp()
    before = fingerprint(model)
    with pytest.raises((ValueError, TypeError)) as info:
        localopt.wrap(model, rule, **{option: value})
    assert f"option {option}=" in str(info.value) and repr(rule) in str(info.value)
    assert unchanged(model, before) and not localopt.is_wrapped(model)


@pytest.mark.parametrize("rule", ["fa", "kp", "wm", "bfa", "frsf"])
@pytest.mark.parametrize("value", ["no", 1, None])
def test_match_norm_must_be_a_bool(rule, value):
    model = mlp()
    before = fingerprint(model)
    with pytest.raises(TypeError, match="match_norm"):
        localopt.wrap(model, rule, match_norm=value)
    assert unchanged(model, before)


@pytest.mark.parametrize("kwargs,err,match", [
    ({"seed": 1.5}, TypeError, "seed=1.5"),
    ({"seed": "0"}, TypeError, "seed='0'"),
    ({"seed": True}, TypeError, "seed=True"),
    ({"include": 5}, TypeError, "include=5"),
    ({"exclude": [nn.Linear, 2.0]}, TypeError, "exclude=.*selector 2.0"),
    ({"unsupported": ["bp"]}, ValueError, "unsupported="),
    ({"scale": math.nan, "rule": "usf"}, ValueError, "scale=nan"),
    ({"scale": -1, "rule": "usf"}, ValueError, "scale=-1"),
    ({"scale": "big", "rule": "usf"}, ValueError, "scale='big'"),
    ({"max_feedback_mb": -1, "rule": "dfa"}, ValueError, "max_feedback_mb=-1"),
    ({"init": ["xavier"]}, ValueError, "init="),
    ({"gain": 0}, ValueError, "gain=0"),
    ({"gain": -0.5}, ValueError, "gain=-0.5"),
    ({"gain": True}, TypeError, "gain=True"),
    ({"gain": "half"}, TypeError, "gain='half'"),
])
def test_bad_wrap_arguments(kwargs, err, match):
    model = mlp()
    before = fingerprint(model)
    kwargs = dict(kwargs)
    rule = kwargs.pop("rule", "fa")
    with pytest.raises(err, match=match):
        localopt.wrap(model, rule, **kwargs)
    assert unchanged(model, before)


def test_numpy_like_integers_are_fine():
    localopt.wrap(mlp(), "wm", samples=torch.tensor(3).item(), seed=int(torch.tensor(2)))


# ------------------------------------------------------------------ optimizers, misuse
def _batch():
    return torch.randn(5, 6), torch.randint(0, 3, (5,))


@pytest.mark.parametrize("rule,opt_cls", [("kp", LocalOptimizer), ("fa", LocalOptimizer),
                                          ("dtp", TargetProp)])
def test_step_after_unwrap_is_a_clear_error(rule, opt_cls):
    model = localopt.wrap(mlp(), rule)
    opt = opt_cls(model, torch.optim.SGD, lr=0.1)
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    localopt.unwrap(model)
    with pytest.raises(RuntimeError, match=r"unwrap.*new optimizer"):
        opt.step()


def test_target_prop_with_a_plain_optimizer_warns_once():
    model = localopt.wrap(mlp(), "dtp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batch()
    with pytest.warns(UserWarning, match=r"localopt\.optim\.TargetProp") as record:
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    assert sum("TargetProp" in str(w.message) for w in record) == 1
    model = localopt.wrap(mlp(), "dtp")
    opt = TargetProp(model, torch.optim.SGD, lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):  # the right optimizer, and a forward without a step: no warning
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            model(x)
            opt.step()


# ------------------------------------------------------------------ exploding feedback
def deep_small_init(n: int = 12) -> nn.Sequential:
    """Weights of std 0.02 (timm's ViT init) in a deep stack: Xavier B is ~6x larger."""
    torch.manual_seed(0)
    layers = []
    for _ in range(n):
        lin = nn.Linear(64, 64)
        nn.init.trunc_normal_(lin.weight, std=0.02)
        layers += [lin, nn.Tanh()]
    return nn.Sequential(*layers)


@pytest.mark.parametrize("rule,remedy", [("fa", "match_norm=True"), ("usf", "scale='norm'"),
                                         ("frsf", "match_norm=True"), ("kp", "match_norm=True")])
def test_exploding_feedback_warns_once_with_the_remedy(rule, remedy):
    with pytest.warns(UserWarning, match=f"larger than the weights.*{remedy}") as record:
        model = localopt.wrap(deep_small_init(), rule)
    assert len(record) == 1 and record[0].filename == __file__
    x = torch.randn(4, 64)
    model(x).square().sum().backward()
    ref = deep_small_init()
    ref(x).square().sum().backward()
    ratio = model[0].weight.grad.norm() / ref[0].weight.grad.norm()
    assert ratio > 100  # the warning is not a false alarm
    fixed = {"usf": {"scale": "norm"}}.get(rule, {"match_norm": True})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = localopt.wrap(deep_small_init(), rule, **fixed)
    model(x).square().sum().backward()
    ratio = model[0].weight.grad.norm() / ref[0].weight.grad.norm()
    assert 0.01 < ratio < 100


@pytest.mark.parametrize("rule", ["fa", "usf", "frsf", "kp", "wm", "bfa"])
def test_no_warning_on_usual_initialisations(rule):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        localopt.wrap(mlp(), rule)
        convnet = nn.Sequential(*[m for _ in range(8) for m in (nn.Conv2d(8, 8, 3), nn.ReLU())])
        localopt.wrap(convnet, rule)
