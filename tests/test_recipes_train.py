"""The training CLI and the benchmark runner end to end on tiny synthetic data: log,
checkpoint, exact resume, plots, table; configs, optimizers and schedules."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from localopt.recipes import benchmark, common, train
from localopt.recipes.common import ConfigError, load_config
from localopt.recipes.synthetic import synthetic_arrays, write_imagefolder

pytestmark = pytest.mark.usefixtures("one_thread", "isolated_data_env")

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    return write_imagefolder(root / "tiny.tar.gz", synthetic_arrays(n_train=48, n_test=16))


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--out-dir", str(out), "--val-size", "16", "--batch-size", "8",
            "--eval-batch-size", "16", "--threads", "1", "--no-progress", *extra]


def _records(run_dir: Path, event: str) -> list[dict]:
    with open(run_dir / "log.jsonl") as fh:
        return [r for r in map(json.loads, fh) if r["event"] == event]


def test_one_epoch_through_the_cli(tiny_data, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "recipes.train", *_args(tiny_data, tmp_path, "--model",
           "mlp3x1024", "--rule", "fa", "--epochs", "1", "--optimizer", "adam", "--lr", "1e-3",
           "--name", "cli")]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "cli: train_acc" in done.stdout
    run = tmp_path / "cli"
    (epoch,), (final,) = _records(run, "epoch"), _records(run, "final")
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "lr",
                "epoch_time_s", "images_per_s", "device", "git", "config"):
        assert epoch[key] is not None, key
    assert epoch["epoch"] == 1 and epoch["step"] == 32 // 8 and epoch["lr"] == 1e-3
    assert epoch["config"]["rule"] == "fa" and epoch["data"].startswith("CIFAR-10, ImageFolder")
    assert 0.0 <= final["test_acc"] <= 1.0 and final["test_acc"] == epoch["test_acc"]
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 1 and any(k.startswith("0.") or "localopt" in k
                                      for k in ckpt["model"])
    assert (run / "curves.png").read_bytes()[:8] == PNG_MAGIC


def _state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", weights_only=False)


METRICS = ("epoch", "step", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss",
           "test_acc")


@pytest.mark.parametrize("rule", ["brsf"])  # redraws its feedback every step: RNG must resume
def test_resume_equals_uninterrupted_run(tiny_data, tmp_path, rule):
    # BN, augmentation, momentum, weight decay, a cosine schedule, a rule that draws every step
    common_args = _args(tiny_data, tmp_path, "--model", "resnet20", "--rule", rule,
                        "--optimizer", "sgd", "--lr", "0.05", "--schedule", "cosine",
                        "--weight-decay", "5e-4", "--epochs", "3",
                        "--model-options", '{init = "xavier", widths = [4, 8, 8]}')
    assert train.main([*common_args, "--name", "straight"]) == 0
    assert train.main([*common_args, "--name", "split", "--stop-after", "1"]) == 0
    assert len(_records(tmp_path / "split", "epoch")) == 1
    # an interrupted epoch may have logged a partial line: resume drops it
    with open(tmp_path / "split" / "log.jsonl", "a") as fh:
        fh.write(json.dumps({"event": "step", "epoch": 2, "step": 5}) + "\n")
    assert train.main([*common_args, "--name", "split", "--resume"]) == 0
    a, b = _state(tmp_path / "straight"), _state(tmp_path / "split")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["epoch"] == b["epoch"] == 3
    ra, rb = _records(tmp_path / "straight", "epoch"), _records(tmp_path / "split", "epoch")
    assert [[r[k] for k in METRICS] for r in ra] == [[r[k] for k in METRICS] for r in rb]
    assert len(_records(tmp_path / "split", "step")) == 0
    assert len(_records(tmp_path / "split", "resume")) == 1
    # the cosine schedule ran over all 3 epochs in both
    assert ra[-1]["lr"] < ra[1]["lr"] < ra[0]["lr"]
    with pytest.raises(SystemExit):  # resuming cannot silently stretch a cosine schedule
        train.main([*common_args, "--name", "split", "--resume", "--epochs", "5"])


def test_resume_keeps_the_rule_options_the_run_started_with(tiny_data, tmp_path, monkeypatch,
                                                          capsys):
    # a library default that changes between the start and the resume (here: bfa's drop_mean)
    from localopt.rules.bidirectional import BFA
    args = _args(tiny_data, tmp_path, "--model", "mlp3x1024", "--rule", "bfa", "--epochs", "2",
                 "--optimizer", "adam", "--lr", "1e-3", "--name", "kept")
    assert train.main([*args, "--stop-after", "1"]) == 0
    start_default = BFA.__init__.__kwdefaults__["drop_mean"]
    (start,) = _records(tmp_path / "kept", "start")
    assert start["rule_options_in_effect"]["drop_mean"] == start_default
    other = start_default is not True  # any value but the start's
    assert _state(tmp_path / "kept")["rule_options_in_effect"] == start["rule_options_in_effect"]
    monkeypatch.setitem(BFA.__init__.__kwdefaults__, "drop_mean", other)
    capsys.readouterr()
    assert train.main([*args, "--resume"]) == 0
    (resumed,) = _records(tmp_path / "kept", "resume")
    assert resumed["rule_options_in_effect"] == start["rule_options_in_effect"]
    err = capsys.readouterr().err
    assert "resumed with the rule options the run started with" in err and "drop_mean" in err
    # a fresh run takes the new default
    assert train.main([*args[:-1], "fresh", "--epochs", "1"]) == 0
    (fresh,) = _records(tmp_path / "fresh", "start")
    assert fresh["rule_options_in_effect"]["drop_mean"] == other


def test_existing_run_needs_resume_or_overwrite(tiny_data, tmp_path, capsys):
    args = _args(tiny_data, tmp_path, "--model", "mlp3x1024", "--rule", "none", "--epochs", "1",
                 "--optimizer", "adam", "--lr", "1e-3", "--name", "again")
    assert train.main(args) == 0
    with pytest.raises(SystemExit) as e:
        train.main(args)
    assert e.value.code == 2 and "--resume" in capsys.readouterr().err
    assert train.main([*args, "--overwrite"]) == 0
    with pytest.raises(SystemExit):
        train.main([*args[:-2], "--name", "never-ran", "--resume"])


def test_missing_data_exits_with_the_options(tmp_path, monkeypatch, capsys):
    from localopt.recipes import data
    monkeypatch.setattr(data, "default_search_paths", lambda: [tmp_path / "none"])
    with pytest.raises(SystemExit) as e:
        train.main(["--out-dir", str(tmp_path), "--epochs", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--data PATH" in err and "--download" in err


def test_benchmark_prints_table_and_one_figure(tiny_data, tmp_path, capsys):
    results = tmp_path / "results"
    args = _args(tiny_data, tmp_path, "--rules", "bp,fa", "--epochs", "2", "--name", "bench",
                 "--results", str(results))
    assert benchmark.main(args) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows] == ["rule", "bp", "fa"]
    assert "CIFAR-10, ImageFolder copy (tiny.tar.gz)" in out and "2 epochs" in out
    for name in ("table.md", "summary.json", "curves.png", "bp.log.jsonl", "fa.log.jsonl"):
        assert (results / name).is_file(), name
    assert (results / "curves.png").read_bytes()[:8] == PNG_MAGIC
    summary = json.loads((results / "summary.json").read_text())
    assert [s["rule"] for s in summary] == ["bp", "fa"] and summary[0]["epoch"] == 2


# ----------------------------------------------------------------------------- configs

def test_shipped_configs_load_and_name_known_models_and_rules():
    import localopt
    from localopt import models
    names = sorted(p.stem for p in common.CONFIG_DIR.glob("*.toml"))
    assert {"main", "mlp_bartunov2018", "mlp_nokland2016", "resnet20_biotorch_sgd",
            "resnet20_biotorch_adam"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert cfg.reference, f"{name}: say which published setup it follows"
        models.create_model(cfg.model, **cfg.model_options)
        for rule in [cfg.rule, *cfg.rules]:
            assert rule in localopt.available_rules(), (name, rule)
    biotorch = load_config("resnet20_biotorch_sgd")
    assert (biotorch.lr, biotorch.weight_decay, biotorch.milestones, biotorch.epochs) == \
        (0.1, 1e-4, [100, 150, 200], 250)


def test_config_errors_name_the_setting(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('modle = "resnet20"\n')
    with pytest.raises(ConfigError, match="'modle'"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="--optimizer 'lbfgs'"):
        load_config(optimizer="lbfgs")
    with pytest.raises(ConfigError, match="epochs = 'x' should be a int"):
        load_config(epochs="x")
    with pytest.raises(ConfigError, match="--config 'nope'"):
        load_config("nope")
    with pytest.raises(ConfigError, match="--milestones"):
        load_config(schedule="step")


def test_cli_overrides_config_file():
    parser = train.build_parser("")
    args = parser.parse_args(["--config", "resnet20_biotorch_sgd", "--epochs", "5", "--rules",
                              "bp,fa", "--milestones", "2,4", "--augment", "false",
                              "--rule-options", '{exclude = "fc"}', "--lr", "1"])
    cfg = common.config_from_args(args)
    assert (cfg.epochs, cfg.rules, cfg.milestones, cfg.augment) == (5, ["bp", "fa"], [2, 4], False)
    assert cfg.rule_options == {"exclude": "fc"} and cfg.lr == 1.0 and cfg.momentum == 0.9
    assert cfg.run_name() == "resnet20_biotorch_sgd-resnet20-bp-s2021"


@pytest.mark.parametrize("optimizer", common.OPTIMIZERS)
def test_every_optimizer_builds_and_steps(optimizer):
    from localopt import models
    model = models.create_model("mlp3x1024", hidden=[8])
    opt = common.make_optimizer(model, load_config(optimizer=optimizer, lr=0.01))
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("optimizer", ["sgd", "muon"])
def test_freeze_keeps_the_named_parameters_at_their_start(optimizer):
    cfg = load_config(model="resnet20", freeze=["*bn*"], optimizer=optimizer, lr=0.05,
                      channels_last=False)
    model = common.apply_rule(common.build_model(cfg, 10, torch.device("cpu")),
                              load_config(rule="dfa", model="resnet20"))
    opt = common.make_optimizer(model, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    frozen = {n for n in before if "bn" in n}
    assert len(frozen) == 2 * 19   # the stem's and every block's two BatchNorms
    for n, p in model.named_parameters():
        assert p.requires_grad == (n not in frozen), n
        assert torch.equal(before[n], p) == (n in frozen), n


def test_freeze_pattern_that_matches_nothing_names_the_option():
    cfg = load_config(model="mlp3x1024", model_options={"hidden": [8]}, freeze=["*bn*"])
    with pytest.raises(ConfigError, match=r"--freeze '\*bn\*': matches no parameter of "
                                          r"--model 'mlp3x1024'"):
        common.build_model(cfg, 10, torch.device("cpu"))
    with pytest.raises(ConfigError, match="--freeze 3: a parameter name or pattern must be"):
        common.build_model(load_config(model="mlp3x1024", freeze=[3]), 10, torch.device("cpu"))


def test_schedules_per_step():
    def lrs(**kw):
        cfg = load_config(epochs=4, lr=1.0, **kw)
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
        sched = common.make_scheduler(opt, cfg, steps_per_epoch=10)
        out = []
        for _ in range(40):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out
    step = lrs(schedule="step", milestones=[1, 3], gamma=0.1)
    assert step[9] == 1.0 and step[10] == pytest.approx(0.1) and step[30] == pytest.approx(0.01)
    cos = lrs(schedule="cosine")
    assert cos[0] == 1.0 and cos[20] == pytest.approx(0.5) and cos[-1] < 0.01
    one = lrs(schedule="onecycle", pct_start=0.25)
    assert max(one) == pytest.approx(1.0) and one.index(max(one)) in (9, 10)
    assert one[0] < 0.1 and one[-1] < 1e-3
    assert set(lrs(schedule="constant")) == {1.0}


def test_bce_loss_matches_definition():
    logits, y = torch.randn(5, 10), torch.tensor([0, 3, 9, 1, 1])
    t = torch.nn.functional.one_hot(y, 10).float()
    want = -(t * logits.sigmoid().log() + (1 - t) * (1 - logits.sigmoid()).log()).sum(1).mean()
    torch.testing.assert_close(common.loss_fn("bce")(logits, y), want)


def test_step_time_runner_builds_each_rule_with_its_optimizer(tmp_path, capsys):
    """One runner for every rule family: plain optimizer, LocalOptimizer, TargetProp (K
    feedback iterations); ratios are to the unwrapped model."""
    from localopt.recipes import step_time
    import localopt
    models_built = {v: step_time.build(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(),
                                                           torch.nn.Linear(3, 2)), v)
                    for v in ["plain", "fa", "kp", "l-drl@3"]}
    assert not localopt.is_wrapped(models_built["plain"][0])
    assert type(models_built["fa"][1]) is torch.optim.SGD
    assert isinstance(models_built["kp"][1], localopt.optim.LocalOptimizer)
    tp = models_built["l-drl@3"][1]
    assert isinstance(tp, localopt.optim.TargetProp)
    assert [g["iters"] for g in tp.feedback_param_groups] == [3]
    out = tmp_path / "t.json"
    assert step_time.main(["--model", "lenet", "--rules", "bp,kp,dtp@2", "--batch", "4",
                           "--steps", "1", "--rounds", "1", "--diagnostics", "kp",
                           "--json", str(out), "--device", "cpu"]) == 0
    res = json.loads(out.read_text())
    assert res["ratio_to_plain"]["plain"] == 1.0
    assert set(res["median_s"]) == {"plain", "bp", "kp", "dtp@2",
                                    "diagnostics.report (kp), per call"}
    assert all(t > 0 for t in res["median_s"].values())
    with pytest.raises(ValueError, match="rule@K"):
        step_time.parse_variant("l-drl@x")


def test_step_time_variant_options_reach_the_rule(tmp_path, capsys):
    """``LABEL=RULE`` plus ``--options LABEL={...}``: the options go to localopt.wrap (a
    module-wise dfa hooks the named modules, plain dfa every layer); the JSON records label,
    rule and options, the printed table the label."""
    from localopt.recipes import step_time
    import localopt
    vs = step_time.parse_variants(["dfa", "dfa-mod=dfa", "t2=dtp@2"],
                                  ['dfa-mod={modules = ["3", "7"]}'])
    assert [(v.label, v.rule, v.iters, v.options) for v in vs] == [
        ("dfa", "dfa", 1, {}), ("dfa-mod", "dfa", 1, {"modules": ["3", "7"]}),
        ("t2", "dtp", 2, {})]
    base = step_time._base_model("lenet", 0, torch.device("cpu"))
    sites = {v.label: [s.name for s in localopt.sites(step_time.build(base, v)[0])]
             for v in vs[:2]}
    assert sites == {"dfa": ["0", "3", "7", "9"], "dfa-mod": ["3", "7"]}
    for entries, options, match in ((["fa", "fa"], [], "twice"),
                                    (["fa"], ["x={a = 1}"], "no variant labelled 'x'"),
                                    (["fa"], ["fa=[1]"], "inline table"),
                                    (["fa"], ["fa={a = "], "TOML"), (["=fa"], [], "LABEL=RULE")):
        with pytest.raises(ValueError, match=match):
            step_time.parse_variants(entries, options)
    with pytest.raises(ValueError, match="'bad'.*beta"):
        step_time.build(base, step_time.parse_variants(["bad=dfa"], ["bad={beta = 1}"])[0])
    # --channels-last: the model (copied and wrapped per variant) and the batch
    cl = step_time._base_model("lenet", 0, torch.device("cpu"), channels_last=True)
    conv = step_time.build(cl, "dfa")[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    x, _ = step_time._batch(2, 0, torch.device("cpu"), channels_last=True)
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    out = tmp_path / "t.json"
    assert step_time.main(["--model", "lenet", "--rules", "fa,dfa-mod=dfa", "--options",
                           'dfa-mod={modules = ["3", "7"]}', "--batch", "2", "--steps", "1",
                           "--rounds", "1", "--device", "cpu", "--channels-last",
                           "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["channels_last"] is True and set(res["ratio_to_plain"]) == {"plain", "fa",
                                                                            "dfa-mod"}
    assert res["variants"]["dfa-mod"] == {"rule": "dfa", "iters": 1,
                                          "options": {"modules": ["3", "7"]}}
    assert res["variants"]["plain"]["rule"] == "plain"
    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith("dfa-mod "))
    assert row.endswith('dfa {modules = ["3", "7"]}')


def test_step_time_variants_from_the_table(tmp_path):
    """--variants-from: one variant per row for the model, with the row's rule options (they
    reach the rule) and optimizer when step_time has it, else the plain one and a note."""
    from localopt.recipes import step_time
    from localopt.recipes.table_runs import TABLE
    import localopt
    vs = {v.label: v for v in step_time.table_variants("resnet20", TABLE)}
    assert "dfa-stage" in vs and "dtp" not in vs  # dtp: an MLP-only row
    assert vs["dfa-stage"].options == {"modules": ["layers.0", "layers.3", "layers.6"]}
    assert vs["dfa"].lr == 1e-3 and vs["dfa"].optimizer is None
    # a Muon row: timed with Muon's parameter groups (its lr, the SGD group's aux_lr), no note
    assert (vs["bp-muon"].optimizer, vs["bp-muon"].lr, vs["bp-muon"].aux_lr,
            vs["bp-muon"].note) == ("muon", 0.02, 0.1, None)
    muon = step_time.build(step_time._base_model("lenet", 0, torch.device("cpu")),
                           vs["bp-muon"])[1]
    assert isinstance(muon, localopt.optim.Muon)
    assert sorted((g["use_muon"], g["lr"]) for g in muon.param_groups) == [(False, 0.1),
                                                                           (True, 0.02)]
    base = step_time._base_model("resnet20", 0, torch.device("cpu"))
    stage = [s.name for s in localopt.sites(step_time.build(base, vs["dfa-stage"])[0])]
    assert stage == ["layers.0", "layers.3", "layers.6"]
    assert len(localopt.sites(step_time.build(base, vs["dfa"])[0])) > len(stage)
    # a row's freeze setting holds those parameters fixed in the timed model
    frozen = step_time.build(base, vs["dfa-lr3e-2-frozen-bn"])[0]
    assert {n for n, p in frozen.named_parameters() if not p.requires_grad} == \
        {n for n, _ in base.named_parameters() if "bn" in n}
    assert all(p.requires_grad for p in step_time.build(base, vs["dfa"])[0].parameters())
    mlp = {v.label: v for v in step_time.table_variants("mlp3x1024", TABLE)}
    assert mlp["dtp"].optimizer == "adam" and mlp["dtp"].feedback_optimizer == "adam"
    assert mlp["dtp"].options["beta"] == pytest.approx(0.0727) and "dfa-stage" not in mlp
    table = tmp_path / "table.toml"
    table.write_text('[rows.bp]\nrule = "bp"\n'
                     '[rows.rms]\nrule = "fa"\nsettings = { lenet = { optimizer = "rmsprop" } }\n'
                     '[rows.ad]\nrule = "usf"\nsettings = { lenet = { optimizer = "adam" } }\n'
                     '[rows.other]\nrule = "fa"\nmodels = ["mlp3x1024"]\n')
    out = tmp_path / "t.json"
    assert step_time.main(["--model", "lenet", "--variants-from", str(table), "--rules",
                           "fa", "--batch", "2", "--steps", "1", "--rounds", "1",
                           "--device", "cpu", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert list(res["ratio_to_plain"]) == ["plain", "bp", "rms", "ad", "fa"]
    assert "optimizer" not in res["variants"]["rms"] and "rmsprop" in res["variants"]["rms"][
        "note"]
    assert res["variants"]["ad"]["optimizer"] == "adam" and "note" not in res["variants"]["ad"]
    with pytest.raises(SystemExit):  # a --rules label that is also a row
        step_time.main(["--model", "lenet", "--variants-from", str(table), "--rules", "bp"])


def test_step_time_sweep_cpu(tmp_path, capsys):
    """--sweep-cpu: images/s of one variant for threads x channels_last x compile, the
    machine described; the process's thread count comes back."""
    from localopt.recipes import step_time
    threads = torch.get_num_threads()
    out = tmp_path / "sweep.json"
    assert step_time.main(["--model", "lenet", "--sweep-cpu", "--batch", "4", "--steps", "1",
                           "--rounds", "1", "--compile-backend", "eager",
                           "--json", str(out)]) == 0
    assert torch.get_num_threads() == threads
    res = json.loads(out.read_text())
    grid = {(r["threads"], r["channels_last"], r["compile"]) for r in res["settings"]}
    assert grid == {(t, cl, c) for t in (1, 2) for cl in (False, True) for c in (False, True)}
    assert all(r["images_per_s"] > 0 and r["images_per_s"] == pytest.approx(4 / r["median_s"])
               for r in res["settings"])
    assert res["rule"] == "bp" and res["model"] == "lenet" and res["batch"] == 4
    assert res["device"].startswith("cpu") and res["machine"]["cores"] == os.cpu_count()
    assert res["best"]["images_per_s"] == max(r["images_per_s"] for r in res["settings"])
    assert "fastest:" in capsys.readouterr().out
    for extra in (["--rules", "bp,fa"], ["--threads", "2"], ["--compile"]):
        with pytest.raises(SystemExit):
            step_time.main(["--model", "lenet", "--sweep-cpu", *extra])
    assert torch.get_num_threads() == threads


def test_max_steps_ends_training_mid_epoch(tiny_data, tmp_path):
    """``max_steps``: training stops after that many optimizer steps, mid-epoch, on the batches
    the uncut run would have seen, and the test set is evaluated then; the schedule spans the
    budget; a budget the epochs cannot hold, or a negative one, is an error naming the key."""
    base = dict(data=str(tiny_data), out_dir=str(tmp_path), val_size=16, batch_size=8,
                eval_batch_size=16, threads=1, model="mlp3x1024", model_options={"hidden": [8]},
                rule="fa", optimizer="sgd", lr=0.05)   # 32 training images: 4 steps per epoch
    train.train(load_config(**base, name="cut", epochs=3, max_steps=6, schedule="constant"),
                progress=False)
    train.train(load_config(**base, name="two", epochs=2, schedule="constant"), progress=False)
    cut, two = _records(tmp_path / "cut", "epoch"), _records(tmp_path / "two", "epoch")
    assert [(r["epoch"], r["step"]) for r in cut] == [(1, 4), (2, 6)]
    assert cut[0]["test_acc"] is None and cut[1]["test_acc"] is not None
    assert _records(tmp_path / "cut", "final")[0]["epoch"] == 2
    assert cut[0]["train_loss"] == two[0]["train_loss"]          # the same batches
    assert cut[1]["train_loss"] != two[1]["train_loss"]          # half of epoch 2
    # a resumed run that spent its budget trains no further
    before = _state(tmp_path / "cut")["model"]
    train.train(load_config(**base, name="cut", epochs=3, max_steps=6, schedule="constant"),
                resume=True, progress=False)
    assert all(torch.equal(v, _state(tmp_path / "cut")["model"][k]) for k, v in before.items())
    assert len(_records(tmp_path / "cut", "epoch")) == 2
    # cosine over the 6 steps, not the 12 of the 3 epochs
    train.train(load_config(**base, name="cos", epochs=3, max_steps=6), progress=False)
    assert _state(tmp_path / "cos")["scheduler"]["T_max"] == 6
    with pytest.raises(ConfigError, match=r"--max-steps 13: .*\(3 x 4 = 12\); raise --epochs"):
        train.train(load_config(**base, name="over", epochs=3, max_steps=13), progress=False)
    with pytest.raises(ConfigError, match="--max-steps -1: must be >= 0"):
        load_config(max_steps=-1)


def test_report_runs_table_reads_train_logs(tiny_data, tmp_path, capsys):
    """``recipes.report --runs-table``: one row per run of ``recipes.train`` logs, from a
    ``runs.jsonl`` (as ``gpu_table.sh`` merges them) or run folders; the effective ``retarget``
    read from the logged optimizer, a non-finite epoch loss (divergence) printed as nan.  The
    run: config ``tp_vgg_ldrl_short`` (its step budget, a feedback warm-up), shrunk."""
    from localopt.recipes import report
    cfg = load_config("tp_vgg_ldrl_short", data=str(tiny_data), out_dir=str(tmp_path),
                      name="ldrl", batch_size=8, eval_batch_size=16, threads=1, max_steps=3,
                      diagnostics_every=0, model_options={"channels": [4, 4, 4, 4, 8]},
                      feedback_options={"feedback_iters": 1, "feedback_lr": 1e-3,
                                        "noise": 0.1, "feedback_warmup": 1})
    train.train(cfg, progress=False)
    start = _records(tmp_path / "ldrl", "start")[0]
    assert "TargetProp(l-drl" in start["optimizer"] and "retarget=True" in start["optimizer"]
    (epoch,) = _records(tmp_path / "ldrl", "epoch")
    assert epoch["step"] == 3 and epoch["test_acc"] is not None and epoch["val_acc"] is None
    lines = [json.dumps({"run": "ldrl", **json.loads(line)})
             for line in (tmp_path / "ldrl" / "log.jsonl").read_text().splitlines()]
    bp_cfg = {**start["config"], "rule": "bp", "rule_options": {}}
    lines += [json.dumps({"run": "bp", "event": "start", "config": bp_cfg}),
              json.dumps({"run": "bp", "event": "epoch", "test_acc": 0.5,
                          "train_loss": float("nan"), "images_per_s": 100.0})]
    (tmp_path / "runs.jsonl").write_text("\n".join(lines) + "\n")
    rows = report.runs_table([tmp_path / "runs.jsonl"]).splitlines()
    assert rows[2].startswith("| ldrl | l-drl, {'beta': 89.6}, retarget | 0.035 | 1 | ")
    assert f"| {100 * epoch['test_acc']:.2f} | {epoch['train_loss']:.3f} |" in rows[2]
    assert rows[3] == "| bp | bp | 0.035 | - | 50.00 | nan | 100 | - |"
    assert len(rows) == 4
    assert report.main(["--runs-table", str(tmp_path / "ldrl")]) == 0
    assert capsys.readouterr().out.splitlines()[2] == rows[2]
    with pytest.raises(SystemExit) as e:
        report.main(["--runs-table", str(tmp_path / "nothing")])
    assert e.value.code == 2 and "--runs-table" in capsys.readouterr().err


def test_compile_option_compiles_the_training_forward(tiny_data, tmp_path, monkeypatch):
    """``compile = true``: training runs through ``torch.compile(model)`` (here with the eager
    backend, for speed); diagnostics, evaluation and the checkpoint use the eager module."""
    compiled = []
    real = torch.compile

    def spy(model, **kw):
        compiled.append(model)
        return real(model, backend="eager")
    monkeypatch.setattr(torch, "compile", spy)
    cfg = load_config(model="mlp3x1024", rule="fa", epochs=1, optimizer="adam", lr=1e-3,
                      data=str(tiny_data), out_dir=str(tmp_path), val_size=16, batch_size=8,
                      eval_batch_size=16, threads=1, compile=True, diagnostics_every=2,
                      name="compiled")
    final = train.train(cfg, progress=False)
    assert len(compiled) == 1 and not hasattr(compiled[0], "_orig_mod")
    assert 0.0 <= final["test_acc"] <= 1.0
    steps = _records(tmp_path / "compiled", "step")
    assert steps and set(steps[0]["alignment"]["update_angle"]) == {"1", "3", "5", "7"}
    ckpt = torch.load(tmp_path / "compiled" / "checkpoint.pt", weights_only=False)
    assert not any("_orig_mod" in k for k in ckpt["model"])


@pytest.mark.parametrize("rule", ["kp", "brsf", "dfa"])
def test_diagnostics_leave_the_training_unchanged(tiny_data, tmp_path, rule):
    """``diagnostics_every`` (the table's ResNet-20 protocols log alignment) only observes: a
    ResNet-20 with BatchNorm trained with a diagnostics record after every step ends with the
    same weights, batch-norm statistics and learned feedback as without."""
    def run(every: int, name: str) -> dict:
        cfg = load_config(model="resnet20", rule=rule, epochs=1, optimizer="sgd", lr=0.05,
                          weight_decay=1e-3, data=str(tiny_data), out_dir=str(tmp_path),
                          val_size=16, batch_size=8, eval_batch_size=16, threads=1,
                          diagnostics_every=every, name=name)
        train.train(cfg, progress=False)
        return torch.load(tmp_path / name / "checkpoint.pt", weights_only=False)["model"]
    plain, observed = run(0, "plain"), run(1, "observed")
    assert _records(tmp_path / "observed", "step") and not _records(tmp_path / "plain", "step")
    assert plain.keys() == observed.keys()
    for k in plain:
        torch.testing.assert_close(observed[k], plain[k], rtol=0, atol=0, msg=k)


def test_a_diverging_run_stops_and_its_final_record_says_so(tiny_data, tmp_path, capsys):
    """A loss that leaves the run's start far behind (or turns non-finite) stops the run with
    a message naming the rule, epoch and step; the final record holds no accuracy."""
    args = _args(tiny_data, tmp_path, "--model", "mlp3x1024", "--rule", "fa", "--epochs", "3",
                 "--optimizer", "sgd", "--lr", "1e4", "--log-every", "1", "--name", "boom")
    assert train.main(args) == 0
    err = capsys.readouterr().err
    (final,) = _records(tmp_path / "boom", "final")
    d = final["diverged"]
    assert d is not None and final["test_acc"] is None and final["test_acc_at_best_val"] is None
    assert f"rule 'fa' diverged at epoch {d['epoch']}, step {d['step']}" in err
    assert not (d["loss"] <= train.DIVERGENCE_FACTOR * d["start_loss"])  # too big, or NaN
    assert len(_records(tmp_path / "boom", "epoch")) == d["epoch"] - 1


def test_a_climb_inside_the_first_window_is_measured_from_the_first_step(tiny_data, tmp_path):
    """The reference loss is the lower of the first step's and the first window's mean: a run
    that blows up within its first window (here: the whole first epoch, 4 steps) is stopped
    there, with a finite loss, not measured against its own inflated start."""
    args = _args(tiny_data, tmp_path, "--model", "mlp3x1024", "--rule", "bp", "--epochs", "2",
                 "--optimizer", "sgd", "--lr", "3", "--name", "climb")
    assert train.main(args) == 0
    (final,) = _records(tmp_path / "climb", "final")
    d = final["diverged"]
    assert d is not None and d["epoch"] == 1 and math.isfinite(d["loss"]), d
    assert d["start_loss"] < 3.0 < d["loss"] / train.DIVERGENCE_FACTOR, d


def test_final_record_has_the_test_accuracy_at_the_best_validation_epoch(tiny_data, tmp_path):
    args = _args(tiny_data, tmp_path, "--model", "mlp3x1024", "--rule", "bp", "--epochs", "3",
                 "--optimizer", "adam", "--lr", "3e-3", "--name", "best")
    assert train.main(args) == 0
    epochs, (final,) = _records(tmp_path / "best", "epoch"), _records(tmp_path / "best", "final")
    best = max(epochs, key=lambda r: r["val_acc"])
    assert final["diverged"] is None and final["best_val_epoch"] == best["epoch"]
    if best["epoch"] == epochs[-1]["epoch"]:
        assert final["test_acc_at_best_val"] == final["test_acc"]
    else:  # the saved model of that epoch, tested
        assert 0.0 <= final["test_acc_at_best_val"] <= 1.0


def test_feedback_probe_measures_the_feedback_along_the_mean_input(tiny_data, tmp_path):
    """``recipes.feedback_probe``: a checkpoint whose first layer outputs the same vector ``h``
    for every image gives the next layer a constant input (mean share 1); a B whose rows lie
    along ``h`` reads 1, one orthogonal to it 0."""
    from recipes import feedback_probe
    cfg = load_config(data=str(tiny_data), out_dir=str(tmp_path), val_size=16, batch_size=8,
                      eval_batch_size=16, threads=1, model="mlp3x1024",
                      model_options={"hidden": [8, 8]}, rule="bidfa", optimizer="sgd",
                      lr=0.05, epochs=1, name="probe")
    train.train(cfg, progress=False)
    run = tmp_path / "probe"
    rows = feedback_probe.probe(run)
    assert [r["layer"] for r in rows] == ["3", "5"]
    assert all(0.0 <= r[k] <= 1.0 for r in rows
               for k in ("B_along_mean", "mean_share", "spread_along_mean"))
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    sd = ckpt["model"]
    bias = torch.linspace(-1.0, 1.0, 8)
    sd["1.weight"].zero_()
    sd["1.bias"].copy_(bias)
    h = torch.tanh(bias)
    other = torch.ones(8) - h * (h.sum() / h.square().sum())     # orthogonal to h
    for B, want in ((torch.outer(torch.arange(1.0, 11.0), h), 1.0),
                    (torch.outer(torch.arange(1.0, 11.0), other), 0.0)):
        sd["3.localopt_feedback"].copy_(B)
        torch.save(ckpt, run / "checkpoint.pt")
        (row3, _) = feedback_probe.probe(run)
        assert row3["mean_share"] == pytest.approx(1.0, abs=1e-5)
        assert row3["B_along_mean"] == pytest.approx(want, abs=1e-5)


def test_feedback_probe_least_squares_inverses():
    """White inputs and orthonormal W: the least-squares inverse is W (0 degrees).  The same
    inputs shifted by a common mean: the plain inverse turns away from W, the centred one
    does not."""
    from recipes.feedback_probe import _inverse_angles
    g = torch.Generator().manual_seed(0)
    Z = torch.randn(20000, 6, generator=g, dtype=torch.float64)
    Z = (Z - Z.mean(0)) @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(Z.t())).t())
    W = torch.linalg.qr(torch.randn(6, 3, generator=g, dtype=torch.float64))[0].t()
    white = _inverse_angles(Z, W, W)
    assert white["B_to_W"] == pytest.approx(0.0, abs=1e-4)
    assert white["inverse_to_W"] == pytest.approx(0.0, abs=0.1)
    shifted = _inverse_angles(Z + 3.0 * torch.linspace(-1.0, 1.0, 6, dtype=torch.float64), W, W)
    assert shifted["inverse_to_W"] > 5.0
    assert shifted["centred_inverse_to_W"] == pytest.approx(0.0, abs=0.1)


def test_feedback_probe_spread_along_the_mean():
    """Inputs that differ only in overall level (a_i times one pattern m) spread along m;
    isotropic noise about the same mean spreads about 1/D along it."""
    from recipes.feedback_probe import mean_shares
    g = torch.Generator().manual_seed(0)
    m = torch.rand(64, generator=g) + 0.5
    level = (torch.rand(4096, 1, generator=g) + 0.5) * m
    noise = m + 0.3 * torch.randn(4096, 64, generator=g)
    B = torch.randn(10, 64, generator=g)
    assert mean_shares(level, B)["spread_along_mean"] == pytest.approx(1.0, abs=1e-4)
    assert mean_shares(noise, B)["spread_along_mean"] == pytest.approx(1 / 64, rel=0.2)
    assert mean_shares(noise, torch.outer(torch.ones(10), m))["B_along_mean"] == \
        pytest.approx(1.0, abs=1e-3)
