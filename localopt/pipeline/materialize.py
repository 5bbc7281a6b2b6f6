"""A stage per process: models built on the meta device, materialised one stage at a time.

A model built under ``torch.device("meta")`` holds shapes, no values.  :func:`materialize` gives
values to the modules a process needs -- in a pipeline, its stage -- and nothing else, so no
process ever holds the whole model.

Values are drawn **by module name**, not by position in the whole model: module ``name``'s
parameters and buffers are those of its ``reset_parameters()`` (or of ``init(name, module)``)
run with torch's global RNG seeded ``mix(seed, crc32(name))`` (:func:`localopt.rng.mix`); a rule's
feedback and random stream at hooked module ``name`` are drawn from the same name-seeded
generator.  So a stage's values do not depend on which other modules a process materialises:
``materialize(model, seed)`` of the whole model in one process gives every module exactly the
values the pipeline's stages give it (the reference of the tests), whatever the split.

This is a different draw from building the model eagerly after ``torch.manual_seed(seed)``
(whose values depend on the order of every module drawn before); a model whose constructor
initialises parameters by hand (rather than in ``reset_parameters``) needs ``init=``: modules
with parameters or buffers that neither covers are refused, by name, before anything changes.

The meta-device path of :func:`~localopt.pipeline.build` lives here too: :func:`meta_plan`, its
shape pass and checks (the same on every rank, before any communication), and
:func:`materialise_stages`, one rank's stages given values.
"""
from __future__ import annotations

import contextlib
import zlib
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from .. import rng
from ..mechanism import Site
from .split import Stage

__all__ = ["materialize", "on_meta", "name_seed", "tensor_bytes",
           "check_initialisable"]


def name_seed(seed: int, name: str) -> int:
    """The seed of module ``name``'s draws: ``mix(seed, crc32(name))``."""
    return rng.mix(int(seed), zlib.crc32(name.encode()))


def on_meta(module: nn.Module) -> bool:
    """True when any parameter or buffer of ``module`` is on the meta device."""
    return any(t.is_meta for t in module.parameters()) or \
        any(t.is_meta for t in module.buffers())


def tensor_bytes(tensors: Iterable[torch.Tensor], materialised_only: bool = True) -> int:
    """Bytes of ``tensors`` (each counted once; meta tensors only when not
    ``materialised_only``)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or id(t) in seen or (materialised_only and t.is_meta):
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def _own(module: nn.Module) -> list[str]:
    """Names of ``module``'s own parameters and buffers (localopt's state excluded)."""
    return [n for n, _ in list(module.named_parameters(recurse=False)) +
            list(module.named_buffers(recurse=False)) if not n.startswith(Site.BUFFER_PREFIX)]


def check_initialisable(modules: Iterable[tuple[str, nn.Module]]) -> None:
    """Raise naming the modules among ``(name, module)`` pairs with parameters or buffers on the
    meta device that no ``reset_parameters()`` of theirs initialises."""
    bare = [f"'{n or '(root)'}' ({type(m).__name__}: {', '.join(_own(m))})"
            for n, m in modules if _own(m) and any(
                t.is_meta for t in list(m.parameters(recurse=False)) +
                list(m.buffers(recurse=False)))
            and not callable(getattr(m, "reset_parameters", None))]
    if bare:
        raise ValueError(
            "localopt.pipeline: cannot initialise " + ", ".join(bare[:5]) +
            (" ..." if len(bare) > 5 else "") + " on a process of its own: no "
            "reset_parameters() draws these values (the constructor did, on the meta device: "
            "nothing).  Pass init=fn(name, module) that initialises them")


def _default_init(name: str, module: nn.Module) -> None:
    module.reset_parameters()


def materialize(model: nn.Module, seed: int, device: "torch.device | str" = "cpu",
                modules: "Iterable[tuple[str, nn.Module]] | None" = None,
                init: "Callable[[str, nn.Module], None] | None" = None,
                sites: "Iterable[Site] | None" = None) -> nn.Module:
    """Give the meta-device ``modules`` of ``model`` (``(name, module)`` pairs and everything
    inside them; default: the whole model) values on ``device``, drawn by module name (see the
    module docstring); returns ``model``.

    ``init(name, module)`` initialises one module's own parameters and buffers (default: its
    ``reset_parameters()``); it runs under the module's name-seeded global RNG.  ``sites``: the
    hooked modules (:func:`localopt.sites`) whose rule state is to be drawn as well (default:
    those inside ``modules``).  A module with parameters or buffers that ``init`` cannot cover is
    an error naming it, raised before anything is changed.

    Called on a whole wrapped model, the rule's state is then marked as loaded (the first
    forward no longer asks for :func:`localopt.reset_feedback`).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"localopt.pipeline: seed={seed!r} must be an int (the seed of the "
                        "by-name initialisation)")
    device = torch.device(device)
    whole = modules is None
    pairs = list(model.named_modules()) if whole else \
        [(f"{n}.{sub}" if sub else n, m) for n, top in modules
         for sub, m in top.named_modules()]
    seen, todo = set(), []
    for name, m in pairs:
        if id(m) not in seen:
            seen.add(id(m))
            todo.append((name, m))
    if init is None:
        check_initialisable(todo)
    init = init or _default_init
    from ..wrap import is_wrapped
    from ..wrap import sites as all_sites
    wrapped = is_wrapped(model)
    if sites is None:
        sites = [s for s in all_sites(model) if id(s.module) in seen] if wrapped else []
    sites = list(sites)
    for name, m in todo:
        if not any(t.is_meta for t in list(m.parameters(recurse=False)) +
                   list(m.buffers(recurse=False))):
            continue
        m.to_empty(device=device, recurse=False)
        if _own(m):
            with rng.private_global_rng(device, name_seed(seed, name)):
                init(name, m)
    for s in sites:
        _draw_site(s, seed, device)
    if whole and wrapped:   # through the public load path: clears the "created on meta" mark
        model.load_state_dict(model.state_dict())
    return model


def _draw_site(site: Site, seed: int, device: torch.device) -> None:
    """The rule state of ``site`` drawn from its name: the rule's own draw from a generator seeded
    by the site's name, its random stream started at that name's seed."""
    m = site.module
    for b in site.buffer_names:   # the site's state only (the module's own may stay on meta)
        t = m.get_buffer(b)
        if t.is_meta:
            m.register_buffer(b, torch.empty_like(t, device=device))
    s = name_seed(seed, "localopt:" + site.name)
    site.rule.redraw(site, torch.Generator().manual_seed(s))
    for b in site.buffer_names:   # a redraw sizes lazily drawn state from meta weights: move it
        t = m.get_buffer(b)
        if t.is_meta:
            m.register_buffer(b, torch.empty(t.shape, dtype=t.dtype, device=device))
    key = Site.BUFFER_PREFIX + rng.BUFFER
    if key in site.buffer_names:
        with torch.no_grad():
            m.get_buffer(key).copy_(rng.stream_state(s, 0))


def meta_plan(model, stages, example, direct, sites, init) -> dict[str, Any]:
    """The checks and shapes of the meta-device path of :func:`~localopt.pipeline.build`, the
    same on every rank and before any communication (a refused set-up fails on every rank at
    once): a shape pass of the whole model on the meta device (rules bypassed; each hooked
    module's input recorded), the stages' composition, each stage's modules (and that ``init``
    can give them values), and (direct) that each stage's first hooked module has feedback
    (``sites``: ``id(module) -> Site`` of the hooked modules)."""
    from ..wrap import sites as wrapped_sites, wrapping
    all_sites = wrapped_sites(model) if wrapping(model) is not None else []
    inputs: dict[int, tuple] = {}

    def record_input(module, args):
        if args and isinstance(args[0], Tensor):
            inputs[id(module)] = (tuple(args[0].shape), args[0].requires_grad)

    hooks = [s.module.register_forward_pre_hook(record_input) for s in all_sites]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with contextlib.ExitStack() as stack:
            for s in all_sites:
                stack.enter_context(s.bypassed())
            ex = torch.empty(example.shape, dtype=example.dtype, device="meta")
            z = model(ex)
            shapes, h = [], torch.empty(example.shape, dtype=example.dtype, device="meta")
            for st in stages:
                h = st(h)
                shapes.append((tuple(h.shape[1:]), h.dtype))
    finally:
        for hk in hooks:
            hk.remove()
        for m, mode in modes:
            m.training = mode
    if not isinstance(z, Tensor) or z.shape != h.shape:
        raise ValueError(
            f"localopt.pipeline: the stages of this {type(model).__name__} do not compose to its "
            f"forward (output {tuple(h.shape)}, the model's "
            f"{tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}; see "
            "localopt.pipeline.split)")
    mods = [stage_modules(model, st) for st in stages]
    if init is None:
        check_initialisable((f"{n}.{sub}" if sub else n, m) for pairs in mods
                            for n, top in pairs for sub, m in top.named_modules())
    for s in range(1, len(stages) if direct else 0):
        site = entry_site(stages[s], sites)
        if not inputs.get(id(site.module), (None, False))[1]:
            raise ValueError(f"localopt.pipeline: schedule='direct': '{site.name}' (first module "
                             f"of stage {s}) has no feedback matrix (its input needs no "
                             "gradient): split after a module with parameters")
    return {"shapes": shapes, "inputs": inputs, "z": tuple(z.shape), "modules": mods,
            "sites": all_sites}


def materialise_stages(model, stages, indices, plan, seed, device, init, direct, next_site):
    """This rank's stages materialised by module name, and (direct rules) the feedback its
    stage uses drawn, as the whole model's first forward would."""
    mods = [pair for i in indices for pair in plan["modules"][i]]
    ids = {id(m) for _, top in mods for m in top.modules()}
    own_sites = [s for s in plan["sites"] if id(s.module) in ids]
    extra = [next_site] if next_site is not None and next_site not in own_sites else []
    materialize(model, seed, device, modules=mods, init=init, sites=own_sites + extra)
    left = [f"{n}.{k}" for n, top in mods for k, t in
            list(top.named_parameters()) + list(top.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"localopt.pipeline: {left[:5]} of this rank's stage are still on the "
                         "meta device after init(): it must give every tensor of its module "
                         "values")
    if direct:
        from ..wrap import wrapping
        rule = wrapping(model).rule
        entries = {id(m) for i in indices if i > 0 for _, m in stages[i].entry()}
        for s in own_sites + extra:
            shape, grad = plan["inputs"].get(id(s.module), (None, False))
            if s is next_site or (grad and id(s.module) not in entries):
                rule.draw_feedback(s, shape, plan["z"])
    return plan["shapes"]


def stage_modules(model: nn.Module, stage: Stage) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the model's modules that ``stage`` runs.  A traced stage's graph
    module calls the model's modules; one that also reads the model's tensors directly
    (``get_attr``: a ViT's ``cls_token``) cannot be materialised alone yet."""
    if stage.names != [""]:
        return list(zip(stage.names, stage.parts))
    gm = stage.parts[0]
    shared, held = [], set()
    for name, m in gm.named_modules():
        if name and m is model.get_submodule(name):
            shared.append((name, m))
            held.update(id(t) for t in list(m.parameters()) + list(m.buffers()))
    direct = [n for n, t in list(gm.named_parameters()) + list(gm.named_buffers())
              if id(t) not in held]
    if direct:
        raise ValueError(f"localopt.pipeline: stage {stage.index} reads {direct[:5]} of the model "
                         "directly (not through a module): materialising such a traced stage on "
                         "its own is not supported; build the model materialised (every rank "
                         "holds it), or give it a pipeline_sequence() whose modules own them")
    return shared


def entry_site(stage: Stage, sites: dict):
    """The outermost hooked module that reads the stage input (None if there is none); ``sites``
    maps ``id(module)`` to its :class:`~localopt.mechanism.Site`."""
    return next((sites[id(m)] for _, m in stage.entry() if id(m) in sites), None)
