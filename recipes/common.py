"""Shared pieces of the recipes: the config, and the ONE place each of these happens --
model building (:func:`build_model`), rule installation (:func:`apply_rule`), optimizer
construction (:func:`make_optimizer`), schedules (:func:`make_scheduler`), the per-step
diagnostics hook (:func:`step_diagnostics`)."""
from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import os
import subprocess
import tomllib
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from localopt import models

from .data import PROTOCOLS, REPO

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "batch_manhattan", "muon")
#: target propagation's feedback optimizers (``feedback_options = {feedback_optimizer = ...}``)
FEEDBACK_OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}
SCHEDULES = ("constant", "step", "cosine", "onecycle")
LOSSES = ("ce", "bce")
AMP = ("none", "bf16")


class ConfigError(ValueError):
    """A bad setting; the message names the flag / config key at fault."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class Config:
    """Everything a run needs.  Config files (TOML, ``recipes/configs``) set these keys;
    every key is also a CLI flag (``epochs`` -> ``--epochs``, ``rule_options`` ->
    ``--rule-options '{exclude = "fc"}'``)."""
    name: str = ""                      # run folder under out_dir (default: see run_name)
    config_name: str = ""               # set from --config: the config file's stem
    reference: str = ""                 # the published setup this config follows
    # model and rule
    model: str = "resnet20"
    model_options: dict = field(default_factory=dict)   # to models.create_model (init, shortcut..)
    freeze: list = field(default_factory=list)  # parameter names or fnmatch patterns kept
                                        # at their initial values (requires_grad off), e.g.
                                        # ["*bn*"]: BatchNorm without a learned scale and shift
    rule: str = "bp"                    # a localopt rule; "none" = plain autograd, no hooks
    rule_options: dict = field(default_factory=dict)    # to localopt.wrap (exclude, options...)
    # target-propagation rules: to localopt.optim.TargetProp (feedback_lr, feedback_iters,
    # noise, feedback_optimizer = "sgd"|"adam", feedback_options = {momentum, betas, ...})
    feedback_options: dict = field(default_factory=dict)
    rules: list = field(default_factory=lambda: ["bp", "fa", "usf"])  # benchmark runner only
    # data and protocol
    data: str = ""                      # path; "" = $LOCALOPT_DATA or the default search
    download: bool = True               # fetch the official CIFAR-10 when none is found
    protocol: str = "val"               # see recipes.data.PROTOCOLS
    val_size: int = 5000
    split_seed: int = 0
    test_every_epoch: bool = False      # also evaluate the test set after every epoch
    augment: bool = True                # random crop (pad 4) + horizontal flip
    crop_padding: int = 4               # augment: random crop with this zero padding; 0 = flip only
    # training
    epochs: int = 3
    max_steps: int = 0                  # > 0: stop after this many optimizer steps (feedback
                                        # warm-up steps included), mid-epoch if need be, and
                                        # evaluate as after the last epoch; the schedule spans
                                        # them (must fit in epochs); 0 = epochs decide
    batch_size: int = 128
    eval_batch_size: int = 1000
    drop_last: bool = True
    loss: str = "ce"                    # "ce", or "bce" (sigmoid + binary CE on one-hot)
    optimizer: str = "sgd"
    lr: float = 0.1                     # muon: the Muon group's (typically 0.02-0.05)
    momentum: float = 0.9               # sgd, rmsprop, batch_manhattan, muon
    nesterov: bool = False              # sgd, muon
    aux_lr: float = 0.0                 # muon: lr of the SGD group (first layer, classifier,
                                        # biases, norms); 0 = same as lr
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])   # adam, adamw
    eps: float = 1e-8                   # adam, adamw, rmsprop
    alpha: float = 0.99                 # rmsprop smoothing
    schedule: str = "cosine"
    milestones: list = field(default_factory=list)   # step: epochs where lr *= gamma
    gamma: float = 0.1
    min_lr: float = 0.0                 # cosine floor
    pct_start: float = 0.3              # onecycle warm-up fraction
    seed: int = 0
    # machine
    device: str = "auto"                # auto (cuda if available), cpu, cuda, cuda:1...
    threads: int = 0                    # torch.set_num_threads when > 0
    channels_last: bool = True          # conv activations and kernels in channels_last
                                        # (CUDA and CPU: ResNet-20 training 1.34x faster on CPU)
    compile: bool = False               # torch.compile the training forward (and its backward)
    amp: str = "none"                   # "bf16": autocast the forward pass to bfloat16
    ddp: int = 0                        # > 1: DistributedDataParallel on this many processes
                                        # (spawned on 127.0.0.1; torchrun sets its own)
    # outputs
    out_dir: str = "runs"
    log_every: int = 50                 # steps between progress-bar metric updates (one sync)
    diagnostics_every: int = 0          # steps between step_diagnostics() records; 0 = never

    def run_name(self) -> str:
        """``name``, else ``[<config>-]<model>-<rule>-s<seed>``."""
        prefix = f"{self.config_name}-" if self.config_name else ""
        return self.name or f"{prefix}{self.model}-{self.rule}-s{self.seed}"

    def validate(self) -> "Config":
        choices = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "loss": LOSSES, "amp": AMP,
                   "protocol": tuple(PROTOCOLS)}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{flag(key)} {getattr(self, key)!r}: choose one of "
                                  f"{', '.join(allowed)}")
        for key in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{flag(key)} {getattr(self, key)}: must be >= 1")
        if self.max_steps < 0:
            raise ConfigError(f"--max-steps {self.max_steps}: must be >= 0 (a number of optimizer "
                              "steps; 0 = no limit)")
        if self.lr <= 0:
            raise ConfigError(f"--lr {self.lr}: must be > 0")
        if self.aux_lr < 0:
            raise ConfigError(f"--aux-lr {self.aux_lr}: must be >= 0 (0 = same as --lr)")
        if self.ddp < 0:
            raise ConfigError(f"--ddp {self.ddp}: must be >= 0 (a number of processes)")
        if self.schedule == "step" and not self.milestones:
            raise ConfigError("--schedule step needs --milestones (epochs, e.g. 100,150,200)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
TYPES = typing.get_type_hints(Config)


def _coerce(key: str, value: Any, origin: str) -> Any:
    """Check/convert ``value`` for Config field ``key`` (ints accepted for floats)."""
    if key not in FIELDS:
        raise ConfigError(f"{origin}: unknown setting {key!r}; known: {', '.join(FIELDS)}")
    want = TYPES[key]
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ConfigError(f"{origin}: {key} = {value!r} should be a {want.__name__}")
    return value


def resolve_config_path(name: str) -> Path:
    p = Path(name)
    for cand in (p, CONFIG_DIR / name, CONFIG_DIR / f"{name}.toml"):
        if cand.is_file():
            return cand
    known = ", ".join(sorted(f.stem for f in CONFIG_DIR.glob("*.toml")))
    raise ConfigError(f"--config {name!r}: no such file; configs in {CONFIG_DIR}: {known}")


def load_config(config: str | None = None, /, **overrides: Any) -> Config:
    """Defaults <- file ``config`` (a path or a name in recipes/configs) <- overrides."""
    values: dict[str, Any] = {}
    if config:
        path = resolve_config_path(config)
        with open(path, "rb") as fh:
            try:
                raw = tomllib.load(fh)
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"--config {path}: {e}") from None
        values.update({k: _coerce(k, v, f"--config {path}") for k, v in raw.items()})
        values["config_name"] = path.stem
    values.update({k: _coerce(k, v, flag(k)) for k, v in overrides.items()})
    return Config(**values).validate()


# ----------------------------------------------------------------------------- CLI

def _parse_value(key: str, text: str) -> Any:
    want = TYPES[key]
    if want is str:
        return text
    if want is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
    if want is list and not text.lstrip().startswith("["):
        text = "[" + ",".join(repr(t.strip()) if not _is_number(t) else t.strip()
                              for t in text.split(",") if t.strip()) + "]"
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as a {want.__name__} "
                                         "(TOML syntax, e.g. 0.1, [1, 2], {k = \"v\"})") from None


def _is_number(t: str) -> bool:
    try:
        float(t)
        return True
    except ValueError:
        return False


def add_config_args(parser: argparse.ArgumentParser, keys: typing.Iterable[str] | None = None,
                    aliases: dict[str, typing.Sequence[str]] | None = None,
                    defaults: Config | None = None, *, config: bool = True) -> None:
    """``--config`` plus one flag per Config field (unset flags keep the config's value);
    ``keys``: only these fields (a recipe that reads a few settings); ``aliases``: more flag
    names of a field (``{"batch_size": ["--batch"]}``); ``defaults``: the config whose values
    the help shows (a recipe's own default config; else Config's defaults); ``config``: False
    for a recipe whose config files come from elsewhere (``recipes.table_runs``: the table's
    protocols), which then has the flags alone.  A true/false flag alone means true
    (``--compile`` is ``--compile true``)."""
    if config:
        parser.add_argument("--config", help="a TOML file or a name in recipes/configs "
                            f"({', '.join(sorted(f.stem for f in CONFIG_DIR.glob('*.toml')))})")
    group = parser.add_argument_group("settings (override the config file)")
    for key in FIELDS if keys is None else keys:
        if key == "config_name":
            continue
        kind = TYPES[key].__name__
        f = FIELDS[key]
        default = getattr(defaults, key) if defaults is not None else f.default_factory() \
            if f.default_factory is not dataclasses.MISSING else f.default
        extra = {"nargs": "?", "const": True} if TYPES[key] is bool else {}
        group.add_argument(flag(key), *(aliases or {}).get(key, ()), dest=key, default=None,
                           metavar=kind.upper(), help=f"default {default!r}",
                           type=lambda text, key=key: _parse_value(key, text), **extra)


def config_overrides(args: argparse.Namespace,
                     keys: typing.Iterable[str] | None = None) -> dict[str, Any]:
    """The settings given as flags (:func:`add_config_args`): ``{key: value}`` of those set,
    of ``keys`` (default: every Config field)."""
    return {k: getattr(args, k) for k in (FIELDS if keys is None else keys)
            if getattr(args, k, None) is not None}


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, **config_overrides(args))


# ----------------------------------------------------------------------------- building

def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name!r}: CUDA is not available on this machine")
    return dev


def build_model(cfg: Config, num_classes: int, device: torch.device) -> nn.Module:
    try:
        model = models.create_model(cfg.model, num_classes=num_classes, **cfg.model_options)
    except ValueError as e:
        raise ConfigError(f"--model {cfg.model!r} / --model-options: {e}") from None
    freeze_parameters(model, cfg.freeze, f"--model {cfg.model!r}")
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def freeze_parameters(model: nn.Module, patterns: list, owner: str) -> None:
    """``requires_grad_(False)`` on the parameters named by ``patterns`` (the ``freeze``
    setting: names or ``fnmatch`` patterns over ``model.named_parameters()``): no optimizer
    sees them.  Every pattern must match a parameter, and nothing is frozen unless all do;
    ``owner`` names the model in the error."""
    if not patterns:
        return
    names = [n for n, _ in model.named_parameters()]
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ConfigError(f"--freeze {pattern!r}: a parameter name or pattern must be a "
                              "string (e.g. \"*bn*\")")
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ConfigError(f"--freeze {pattern!r}: matches no parameter of {owner} (its "
                              f"parameters are named like {', '.join(names[:3])}, ...)")
    for n, p in model.named_parameters():
        if any(fnmatch.fnmatchcase(n, pattern) for pattern in patterns):
            p.requires_grad_(False)


def apply_rule(model: nn.Module, cfg: Config, in_effect: dict | None = None) -> nn.Module:
    """The one place a learning rule is installed: ``localopt.wrap(model, rule, ...)``.
    Feedback randomness is seeded by ``cfg.seed`` unless ``rule_options`` sets ``seed``.
    ``in_effect``: every option of the rule as a run started with it (:func:`rule_in_effect`
    of its checkpoint), which a resumed run keeps even where the library's defaults changed."""
    if cfg.rule == "none":
        return model
    import localopt
    if cfg.rule not in localopt.available_rules():
        raise ConfigError(f"--rule {cfg.rule!r}: available rules: "
                          f"{', '.join(localopt.available_rules())} (or 'none' for plain "
                          "autograd)")
    options = {"seed": cfg.seed, **cfg.rule_options, **(in_effect or {})}
    try:
        return localopt.wrap(model, cfg.rule, **options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--rule {cfg.rule!r} / --rule-options {cfg.rule_options}: {e}") from None


def rule_in_effect(model: nn.Module) -> dict | None:
    """Every option of the rule on ``model``, defaults included (``localopt.wrapping``), or
    None for a plain model: what a checkpoint records so that a resume wraps the same rule."""
    import localopt
    w = localopt.wrapping(model)
    return None if w is None else dict(w.options)


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """The one place optimizers are built (rules that learn feedback add their params here).
    ``model`` may be wrapped in ``DistributedDataParallel``: the feedback optimizers then
    average what the feedback learns over its ranks.

    ``muon``: :class:`localopt.optim.Muon` on :func:`localopt.optim.muon_param_groups` --
    Muon (torch's default lr scaling, ``adjust_lr_fn=None``; ``lr`` typically 0.02-0.05) for
    the hidden weights, conv kernels as ``(out, in*kh*kw)`` matrices; SGD (``aux_lr``, or
    ``lr``) for the first layer, the classifier, biases and norms.  ``momentum``, ``nesterov``
    and ``weight_decay`` apply to both (decoupled in the Muon group, L2 in the SGD group)."""
    params = [p for p in model.parameters() if p.requires_grad]
    o = cfg.optimizer
    import localopt
    inner = localopt.distributed.unwrap_parallel(model)

    def build(cls, params=params, **kwargs):  # rules that learn feedback: LocalOptimizer
        if localopt.is_wrapped(inner) and localopt.rules.target_prop.is_target_prop(inner):
            fb = dict(cfg.feedback_options)
            name = fb.pop("feedback_optimizer", "sgd")
            if name not in FEEDBACK_OPTIMIZERS:
                raise ConfigError(f"--feedback-options feedback_optimizer={name!r}: choose one "
                                  f"of {', '.join(FEEDBACK_OPTIMIZERS)}")
            if "betas" in fb.get("feedback_options", {}):
                fb["feedback_options"] = {**fb["feedback_options"],
                                          "betas": tuple(fb["feedback_options"]["betas"])}
            try:
                return localopt.optim.TargetProp(model, cls, params, feedback_optimizer=
                                                 FEEDBACK_OPTIMIZERS[name], **fb, **kwargs)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"--feedback-options {cfg.feedback_options}: {e}") from None
        if localopt.is_wrapped(inner) and localopt.sites(inner)[0].rule.learns_feedback:
            return localopt.optim.LocalOptimizer(model, cls, params, **kwargs)
        return cls(params, **kwargs)
    if o == "sgd":
        return build(torch.optim.SGD, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                     weight_decay=cfg.weight_decay)
    if o in ("adam", "adamw"):
        cls = torch.optim.Adam if o == "adam" else torch.optim.AdamW
        return build(cls, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                     weight_decay=cfg.weight_decay)
    if o == "rmsprop":
        return build(torch.optim.RMSprop, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps,
                     momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if o == "batch_manhattan":
        return build(localopt.optim.BatchManhattan, lr=cfg.lr, momentum=cfg.momentum,
                     weight_decay=cfg.weight_decay)
    if o == "muon":
        groups = localopt.optim.muon_param_groups(inner, aux={"lr": cfg.aux_lr or cfg.lr})
        return build(localopt.optim.Muon, params=groups, lr=cfg.lr, momentum=cfg.momentum,
                     nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    raise ConfigError(f"--optimizer {o!r}: choose one of {', '.join(OPTIMIZERS)}")


def make_scheduler(opt: torch.optim.Optimizer, cfg: Config,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per training step; ``milestones`` are in epochs; cosine and onecycle span
    ``epochs`` or, when it is set and smaller, ``max_steps``."""
    s, total = cfg.schedule, cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    sched = torch.optim.lr_scheduler
    if s == "constant":
        return sched.LambdaLR(opt, lambda _: 1.0)
    if s == "step":
        return sched.MultiStepLR(opt, [int(m) * steps_per_epoch for m in cfg.milestones],
                                 gamma=cfg.gamma)
    if s == "cosine":
        return sched.CosineAnnealingLR(opt, T_max=total, eta_min=cfg.min_lr)
    if s == "onecycle":
        # each group's own peak (muon: the SGD group's aux_lr)
        return sched.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                                total_steps=total, pct_start=cfg.pct_start)
    raise ConfigError(f"--schedule {s!r}: choose one of {', '.join(SCHEDULES)}")


def loss_fn(name: str):
    if name == "ce":
        return F.cross_entropy

    def bce(logits: Tensor, y: Tensor) -> Tensor:
        target = F.one_hot(y, logits.shape[1]).to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / len(y)
    return bce


def step_diagnostics(model: nn.Module, cfg: Config, step: int, x: Tensor | None = None,
                     y: Tensor | None = None) -> dict[str, Any]:
    """Extra JSON fields logged every ``cfg.diagnostics_every`` steps: per-layer alignment
    (:func:`recipes.alignment.alignment_record`) on the batch ``(x, y)``."""
    from .alignment import alignment_record
    criterion = loss_fn(cfg.loss)
    return alignment_record(model, lambda out, t: criterion(out.float(), t), x, y)


# ----------------------------------------------------------------------------- provenance

@lru_cache(maxsize=None)
def git_commit() -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the repo the recipes run from."""
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain",
                                     "--untracked-files=no"], capture_output=True, text=True,
                                    timeout=10).stdout.strip()) if sha else None
    except (OSError, subprocess.SubprocessError):
        sha, dirty = None, None
    return {"commit": sha, "dirty": dirty}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]
