"""Cutting a model into pipeline stages at named modules, without changing the model.

A model can be cut where its forward is a *sequence*: ``forward(x) = m_k(...m_2(m_1(x)))``.

* an ``nn.Sequential`` is its children in order; a child that is itself an ``nn.Sequential``
  is opened when a split point names something inside it (``"layers.3"`` opens ``layers``);
* any other model can declare its sequence with the protocol method
  ``pipeline_sequence(self) -> list[tuple[str, nn.Module]]``: ``(name, module)`` pairs whose
  composition is ``forward``.  Names of the model's own modules are the ones of
  ``named_modules()`` (so split points, ``wrap``'s selectors and ``state_dict`` keys agree);
  parameter-free helpers that the forward calls functionally (``F.relu``, pooling) are given as
  fresh modules under names of their own.  ``build`` checks the composition against
  ``model(example)`` once.

* any other model is traced by ``torch.fx`` (:mod:`localopt.pipeline.trace`): timm and
  torchvision ResNets, timm ViTs; its stages are segments of the traced graph that call the
  model's own modules (so ``wrap``'s hooks fire in them), cut before the modules named.

A name inside a module of the sequence that is not an ``nn.Sequential`` is an error that says
so.  ``build`` refuses a split that leaves a parameter or buffer in no stage
(:func:`check_coverage`).

Stages are :class:`Stage` modules that *refer* to the model's modules (no copy, nothing of the
model is moved or re-parented): training a stage trains the model's own parameters, and the
model stays whole whatever happens.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

__all__ = ["Stage", "sequence", "split_stages", "check_coverage"]


class Stage(nn.Module):
    """One pipeline stage: the modules ``names`` of a model, applied in order."""

    def __init__(self, index: int, names: list[str], modules: list[nn.Module],
                 entry: "list[tuple[str, nn.Module]] | None" = None, label: str = "") -> None:
        super().__init__()
        self.index = index
        self.names = list(names)
        self.parts = nn.ModuleList(modules)
        self._entry = entry       # traced stages (localopt.pipeline.trace) know theirs
        self.label = label

    def forward(self, x: Tensor) -> Tensor:
        for m in self.parts:
            x = m(x)
        return x

    def entry(self) -> list[tuple[str, nn.Module]]:
        """The modules that receive the stage input as their input, outermost first: the
        first module, and while it is an ``nn.Sequential``, its first child."""
        if self._entry is not None:
            return list(self._entry)
        name, m = self.names[0], self.parts[0]
        chain = [(name, m)]
        while isinstance(m, nn.Sequential) and len(m) > 0:
            child, m = next(iter(m.named_children()))
            name = f"{name}.{child}"
            chain.append((name, m))
        return chain

    def extra_repr(self) -> str:
        if self._entry is not None:
            return f"index={self.index}, traced from {self.label!r}"
        return f"index={self.index}, modules={self.names}"


def sequence(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The top-level ``(name, module)`` sequence of ``model`` (see the module docstring)."""
    seq_fn = getattr(model, "pipeline_sequence", None)
    if callable(seq_fn):
        seq = list(seq_fn())
        for item in seq:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                    and isinstance(item[1], nn.Module)):
                raise TypeError(f"localopt.pipeline: {type(model).__name__}.pipeline_sequence() "
                                "must return (name, nn.Module) pairs")
        return seq
    if isinstance(model, nn.Sequential):
        return list(model.named_children())
    raise TypeError(
        f"localopt.pipeline: cannot cut a {type(model).__name__} into stages: its forward is not "
        "known to be a sequence of modules.  Use an nn.Sequential (nested Sequentials can be cut "
        "inside, e.g. 'layers.3'), or give the model a method pipeline_sequence() returning the "
        "(name, module) pairs whose composition is its forward (see localopt.pipeline.split)")


def _open(seq: list[tuple[str, nn.Module]], name: str) -> list[tuple[str, nn.Module]] | None:
    """``seq`` with the Sequential that contains ``name`` opened into its children (recursively),
    or None if no entry of ``seq`` contains ``name``."""
    for i, (n, m) in enumerate(seq):
        if name == n:
            return seq
        if name.startswith(n + "."):
            if not isinstance(m, nn.Sequential):
                raise ValueError(
                    f"localopt.pipeline: split point {name!r} is inside '{n}' "
                    f"({type(m).__name__}), which is not an nn.Sequential: a stage can only "
                    f"begin at a module of the model's sequence (e.g. '{n}' itself)")
            inner = [(f"{n}.{c}", cm) for c, cm in m.named_children()]
            opened = _open(inner, name)
            if opened is None:
                return None
            return seq[:i] + opened + seq[i + 1:]
    return None


def split_stages(model: nn.Module, split: Sequence[str]) -> list[Stage]:
    """Cut ``model`` into ``len(split) + 1`` :class:`Stage` modules; stage ``s >= 1`` begins at
    the module named ``split[s-1]``.  Raises naming the split point that names no module of the
    sequence, is out of order, or leaves a stage empty; the model is never modified."""
    if isinstance(split, str):
        raise TypeError(f"localopt.pipeline: split must be a list of module names, got the "
                        f"string {split!r} (write [{split!r}])")
    split = list(split)
    for s in split:
        if not isinstance(s, str):
            raise TypeError(f"localopt.pipeline: split entry {s!r} is not a module name (str)")
    if not (callable(getattr(model, "pipeline_sequence", None)) or
            isinstance(model, nn.Sequential)):
        from .trace import traced_stages
        return traced_stages(model, split)
    seq = sequence(model)
    for name in split:
        opened = _open(seq, name)
        if opened is None:
            names = [n for n, _ in seq]
            raise ValueError(
                f"localopt.pipeline: split point {name!r} names no module of this "
                f"{type(model).__name__}'s sequence; its sequence is {names} (modules inside an "
                "nn.Sequential entry are named '<entry>.<child>')")
        seq = opened
    names = [n for n, _ in seq]
    cuts = [names.index(s) for s in split]
    for k, (a, b) in enumerate(zip([0] + cuts, cuts)):
        if b == 0:
            raise ValueError(f"localopt.pipeline: split point {split[k]!r} is the first module "
                             "of the model: stage 0 would be empty")
        if b <= a:
            raise ValueError(f"localopt.pipeline: split point {split[k]!r} does not come after "
                             f"{split[k - 1]!r} in the model's sequence: split points must be "
                             "distinct and in forward order")
    bounds = [0] + cuts + [len(seq)]
    return [Stage(i, names[a:b], [m for _, m in seq[a:b]])
            for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]


def check_coverage(model: nn.Module, stages: Sequence[nn.Module]) -> None:
    """Raise naming every parameter or buffer of ``model`` that no stage holds (a sequence that
    leaves out, e.g., a ViT's ``cls_token`` would never train it)."""
    held = {id(t) for st in stages for t in list(st.parameters()) + list(st.buffers())}
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if id(t) not in held]
    if left:
        raise ValueError(
            f"localopt.pipeline: {left[:6]}{' ...' if len(left) > 6 else ''} of this "
            f"{type(model).__name__} belong to no stage: its sequence leaves them out, so no "
            "stage would train or keep them.  Give the sequence modules that own them (e.g. a "
            "module that adds the position embedding), or split a model whose forward is its "
            "sequence")


_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def blocks(model: nn.Module) -> list[str]:
    """The names of ``model``'s blocks, whatever its depth: the children of every container
    (``nn.Sequential``/``nn.ModuleList``) whose children are all of one module type that is not
    a single layer -- a CIFAR ResNet's ``layers.0 ... layers.N``, a timm or torchvision ResNet's
    ``layer1.0 ... layer4.1``, a timm ViT's ``blocks.0 ... blocks.11``.  For module-wise DFA on
    every block, ``wrap(model, "dfa", modules=blocks(model))``, and split points.  (A name
    pattern such as ``"layers.?"`` matches one character: blocks 0-9 only.)"""
    out: list[str] = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Sequential, nn.ModuleList)) or not len(m) or \
                any(name.startswith(b + ".") or name == b for b in out):
            continue
        kids = list(m.named_children())
        kinds = {type(c) for _, c in kids}
        if len(kinds) == 1 and not issubclass(next(iter(kinds)), _LAYERS) and \
                any(True for _ in kids[0][1].parameters()):
            out += [f"{name}.{c}" if name else c for c, _ in kids]
    if not out:
        raise ValueError(f"localopt.pipeline.blocks: this {type(model).__name__} has no container "
                         "of repeated blocks (an nn.Sequential or nn.ModuleList whose children "
                         "share one type); name its modules yourself")
    return out
