"""Stages of any model whose forward ``torch.fx`` can trace: a ResNet, a ViT.

The model's ``forward`` is traced once with every module a leaf except the root and the
``nn.Sequential``/``nn.ModuleList`` containers (so a ViT's ``blocks.6`` and a ResNet's
``layer3.0`` are calls of their own, and hooks of :func:`localopt.wrap` fire on them as in the
model).  Split point ``name`` cuts the graph just before the call of module ``name`` (or, for a
container, of the first module inside it).  Stage ``s`` is the segment of the graph between two
cuts, a ``torch.fx.GraphModule`` that refers to the model's own modules and parameters (nothing
is copied): the functional glue between module calls -- a ViT's ``cat`` of the ``cls_token`` and
add of ``pos_embed``, a ResNet's ``flatten`` -- runs in the stage that computes it.

A cut is a sequence point only when a single value crosses it: the input of the split point's
module.  A split where another value also crosses (a skip connection around the cut, the model
input used later) is refused, naming the values, as is a module called more than once or not
at all.  Parameters read by ``get_attr`` (``cls_token``) go with the stage that reads them.
"""
from __future__ import annotations

import inspect
from typing import Sequence

import torch
from torch import nn

__all__ = ["trace", "traced_stages"]


def trace(model: nn.Module) -> "torch.fx.Graph":
    """``model.forward`` traced by ``torch.fx`` with every module but the containers a leaf
    (optional arguments fixed at their defaults); raises ``TypeError`` naming the reason when
    it cannot be traced."""
    import torch.fx as fx

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return not isinstance(m, (nn.Sequential, nn.ModuleList))

    params = list(inspect.signature(model.forward).parameters.values())[1:]
    concrete = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    try:
        return _Tracer().trace(model, concrete_args=concrete or None)
    except Exception as exc:  # noqa: BLE001 -- whatever fx raises, the user's fix is the same
        raise TypeError(
            f"localopt.pipeline: cannot cut a {type(model).__name__} into stages: it is not an "
            "nn.Sequential, has no pipeline_sequence(), and torch.fx cannot trace its forward "
            f"({type(exc).__name__}: {exc}).  Give the model a pipeline_sequence() method "
            "(see localopt.pipeline.split)") from exc


def _copyable(node) -> bool:
    """A node any segment can recompute: a parameter read or an argument fixed at its default."""
    return node.op == "get_attr" or (node.op == "placeholder" and bool(node.args))


def traced_stages(model: nn.Module, split: Sequence[str]):
    """Cut the traced forward of ``model`` at the modules named ``split`` (in forward order);
    returns :class:`~localopt.pipeline.split.Stage` objects, one ``GraphModule`` each."""
    import torch.fx as fx

    from .split import Stage

    graph = trace(model)
    nodes = [n for n in graph.nodes]
    inputs = [n for n in nodes if n.op == "placeholder" and not n.args]  # the others: defaults
    out = next(n for n in nodes if n.op == "output")
    if len(inputs) != 1:
        raise ValueError(f"localopt.pipeline: the forward of this {type(model).__name__} takes "
                         f"{len(inputs)} inputs; a pipeline passes one tensor")
    z = out.args[0]
    if not isinstance(z, fx.Node):
        raise ValueError(f"localopt.pipeline: the forward of this {type(model).__name__} returns "
                         f"{type(z).__name__}, not one tensor")
    body = [n for n in nodes if n.op not in ("placeholder", "output")]
    calls = [n for n in body if n.op == "call_module"]
    order = {n: i for i, n in enumerate(body)}
    cuts = []
    for name in split:
        same = [n for n in calls if n.target == name]
        inside = [n for n in calls if n.target.startswith(name + ".")]
        if len(same) > 1 or (not same and len({n.target for n in inside}) != len(inside)):
            raise ValueError(f"localopt.pipeline: split point {name!r} is called more than once "
                             "by the forward: a stage cannot begin there")
        hit = same[0] if same else (inside[0] if inside else None)
        if hit is None:
            raise ValueError(
                f"localopt.pipeline: split point {name!r} names no module that the forward of "
                f"this {type(model).__name__} calls; it calls, in order: "
                f"{[n.target for n in calls]}")
        cuts.append((name, hit))
    idx = [order[n] for _, n in cuts]
    for k, (name, node) in enumerate(cuts):
        if idx[k] == 0 or all(n.op == "get_attr" for n in body[:idx[k]]):
            raise ValueError(f"localopt.pipeline: split point {name!r} is the first module of the "
                             "model: stage 0 would be empty")
        if k and idx[k] <= idx[k - 1]:
            raise ValueError(f"localopt.pipeline: split point {name!r} does not come after "
                             f"{cuts[k - 1][0]!r} in the forward: split points must be distinct "
                             "and in forward order")
        arg = node.args[0] if node.args else None
        if not isinstance(arg, fx.Node):
            raise ValueError(f"localopt.pipeline: split point {name!r}: its module's first "
                             "argument is not a value of the forward")
    bounds = [0] + idx + [len(body)]
    values = [inputs[0]] + [n.args[0] for _, n in cuts] + [z]
    stages = []
    for s in range(len(bounds) - 1):
        seg = body[bounds[s]:bounds[s + 1]]
        inside = set(seg)
        crossing = {a for n in seg for a in n.all_input_nodes
                    if a not in inside and not _copyable(a) and a is not values[s]}
        if crossing or values[s + 1] not in inside:
            names = sorted(str(a) for a in crossing) or [str(values[s + 1])]
            where = f"split point {split[s - 1]!r}" if s else "the model input"
            raise ValueError(
                f"localopt.pipeline: stage {s} (from {where}) needs {names} from an earlier "
                "stage besides its input: the forward is not a sequence at this split (a skip "
                "connection crosses it); split at another module")
        g = fx.Graph()
        env = {values[s]: g.placeholder("x")}

        def lookup(a, env=env, g=g):
            if a not in env:   # a parameter (or fixed argument) read in other segments too
                env[a] = g.node_copy(a, lookup)
            return env[a]

        for n in seg:
            env[n] = g.node_copy(n, lookup)
        g.output(env[values[s + 1]])
        gm = fx.GraphModule(model, g, class_name=f"Stage{s}")
        first = next((n for n in seg if n.op == "call_module" and values[s] in n.all_input_nodes),
                     None)
        entry = []
        if first is not None:
            if s and cuts[s - 1][1] is first and cuts[s - 1][0] != first.target:
                entry.append((cuts[s - 1][0], model.get_submodule(cuts[s - 1][0])))
            entry.append((first.target, model.get_submodule(first.target)))
        stages.append(Stage(s, [""], [gm], entry=entry,
                            label=cuts[s - 1][0] if s else "(input)"))
    return stages
