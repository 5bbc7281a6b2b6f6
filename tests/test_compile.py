"""torch.compile of wrapped models: no graph break, and the same gradients as eager.

Graph breaks are counted with ``torch._dynamo.explain`` (no code generation: fast); the
gradient checks compile with the ``aot_eager`` backend -- dynamo plus AOTAutograd's joint
forward/backward graph, which is where a rule's substituted backward must survive tracing --
and one check with inductor, the default backend.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import localopt

pytestmark = pytest.mark.usefixtures("one_thread")

NO_BREAK_RULES = ["bp", "fa", "usf", "brsf", "frsf", "kp", "wm", "dfa", "bdfa", "drtp"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(),
                         nn.Linear(12, 4))


class ResNetLet(nn.Module):
    """Conv, BatchNorm, in-place ReLU, a residual addition, pooling and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        h = self.relu(self.stem(x))
        h = self.relu(self.bn(self.conv(h)) + h)
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


def one_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    for p in model.parameters():
        p.grad = None
    F.cross_entropy(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("rule", NO_BREAK_RULES)
def test_compiled_forward_has_no_graph_break(rule):
    torch.manual_seed(0)
    model = localopt.wrap(mlp(), rule, seed=0)
    x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # learned feedback without LocalOptimizer: irrelevant
        one_step(model, x, y)            # direct rules draw B in their first forward
    ex = torch._dynamo.explain(model)(x)
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), [r.reason for r in ex.break_reasons]


@pytest.mark.parametrize("rule", ["fa", "dfa"])
def test_root_hooks_trace_into_the_forward_graph(rule):
    # torch.compile runs the hooks of a user-defined root module as separate frames unless
    # dynamo wraps the top frame; traced together, the whole model is one graph
    torch.manual_seed(0)
    model = localopt.wrap(ResNetLet(), rule, seed=0)
    x, y = torch.randn(2, 3, 6, 6), torch.randint(0, 5, (2,))
    one_step(model, x, y)
    with torch._dynamo.config.patch(wrap_top_frame=True):
        ex = torch._dynamo.explain(model)(x)
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), [r.reason for r in ex.break_reasons]


@pytest.mark.parametrize("rule, options", [
    ("fa", {}), ("fa", {"track_norm": True}), ("usf", {}), ("usf", {"scale": "norm"}),
    ("brsf", {}), ("frsf", {"track_norm": True}), ("dfa", {}), ("bdfa", {}), ("drtp", {}),
    ("kp", {}), ("dkp", {"fixed_norm": True})])
def test_compiled_gradients_equal_eager(rule, options):
    torch.manual_seed(0)
    eager = localopt.wrap(ResNetLet(), rule, seed=3, **options)
    compiled_model = localopt.wrap(ResNetLet(), rule, seed=3, **options)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, backend="aot_eager")
    g = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(3):  # the first step draws dfa's B inside the compiled call
            x, y = torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 5, (4,), generator=g)
            want, got = one_step(eager, x, y), one_step(compiled, x, y)
            for a, b in zip(want, got):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
            with torch.no_grad():  # same update on both: the next step sees new weights
                for p, q in zip(eager.parameters(), compiled_model.parameters()):
                    p.sub_(0.1 * p.grad)
                    q.sub_(0.1 * q.grad)
    if rule == "dfa":  # the substituted input gradient really is e @ B, not backprop's
        localopt.unwrap(eager)
        bp = one_step(eager, x, y)
        assert not torch.allclose(bp[0], got[0])


@pytest.mark.parametrize("rule", ["dfa", "kp"])
def test_compiled_training_step_is_one_graph_as_for_the_plain_model(rule):
    # dynamo stops at loss.backward() for any model (it is not traced; the backward then runs
    # the graph compiled with the forward): the wrapped model adds nothing to that
    counts = {}
    for r in ("plain", rule):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = mlp() if r == "plain" else localopt.wrap(mlp(), r, seed=0)
        x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))

        def step(x, y):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            step(x, y)
        ex = torch._dynamo.explain(step)(x, y)
        counts[r] = (ex.graph_count, ex.graph_break_count)
    assert counts[rule] == counts["plain"] == (1, 0)


def test_inductor_dfa_matches_eager():
    torch.manual_seed(0)
    model = localopt.wrap(mlp(), "dfa", seed=0)
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    want = one_step(model, x, y)
    got = one_step(torch.compile(model), x, y)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_compiled_dfa_still_raises_without_the_output_error():
    torch.manual_seed(0)
    model = localopt.wrap(mlp(), "dfa", seed=0)
    x = torch.randn(3, 6, requires_grad=True)
    one_step(model, x, torch.tensor([0, 1, 2]))
    h = model[0](x)  # a layer run outside the model's forward: no output error reaches it
    with pytest.raises(RuntimeError, match="inside that forward"):
        torch.compile(model[2], backend="aot_eager")(torch.tanh(model[1](h))).sum().backward()


@pytest.mark.parametrize("rule", ["kp", "wm", "bfa", "dkp", "dkp-fixed", "bidfa",
                                  "bidfa-center", "bidfa-keep-mean", "bfa-keep-mean"])
def test_compiled_training_learns_the_same_feedback_as_eager(rule):
    # what a rule learns of its feedback (B.grad, normalisers) is computed in hooks and the
    # backward pass; under torch.compile it must reach LocalOptimizer exactly as in eager
    from localopt.optim import LocalOptimizer

    def train(compiled: bool) -> list[dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        name, options = {"dkp-fixed": ("dkp", {"fixed_norm": True}),
                         "bidfa-center": ("bidfa", {"center": True}),
                         "bidfa-keep-mean": ("bidfa", {"drop_mean": False}),
                         "bfa-keep-mean": ("bfa", {"drop_mean": False})}.get(rule, (rule, {}))
        model = localopt.wrap(ResNetLet(), name, seed=3, **options)
        opt = LocalOptimizer(model, torch.optim.SGD, lr=0.05, momentum=0.9)
        forward = torch.compile(model, backend="aot_eager") if compiled else model
        g = torch.Generator().manual_seed(1)
        feedback = []
        for _ in range(3):
            x, y = torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 5, (4,), generator=g)
            opt.zero_grad()
            F.cross_entropy(forward(x), y).backward()
            opt.step()
            feedback.append({n: b.clone() for n, b in model.named_buffers()
                             if n.endswith("feedback") and b.numel()})
        return feedback

    eager, compiled = train(False), train(True)
    assert eager[-1] and eager[-1].keys() == compiled[-1].keys()
    for name, b in eager[-1].items():
        torch.testing.assert_close(compiled[-1][name], b, rtol=1e-4, atol=1e-6)
    # the feedback did learn between the first and the last step: not two constants compared
    assert any(not torch.equal(eager[0][n], b) for n, b in eager[-1].items())
