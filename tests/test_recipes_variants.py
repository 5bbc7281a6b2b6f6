"""One variant syntax for the runners that compare rules (``recipes.variants``), read by both
``recipes.benchmark`` and ``recipes.step_time``; step_time's settings come from a config."""
from __future__ import annotations

import argparse

import pytest

from localopt.recipes import benchmark, step_time, variants
from localopt.recipes.common import ConfigError, add_config_args, load_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_both_runners_read_variants_with_the_one_parser():
    assert step_time.parse_variants is variants.parse_variants
    assert benchmark.parse_variants_list is variants.parse_variants
    vs = variants.parse_variants(["fa", "tp5=l-drl@5", "st=dfa"], ['st={modules = ["a"]}'],
                                 default_iters=None)
    assert [(v.label, v.rule, v.iters, v.options) for v in vs] == [
        ("fa", "fa", None, {}), ("tp5", "l-drl", 5, {}), ("st", "dfa", None, {"modules": ["a"]})]
    assert [v.spec for v in vs] == ["fa", "l-drl@5", "dfa"]
    with pytest.raises(ConfigError, match="rule@K"):
        variants.parse_variants(["l-drl@x"])
    with pytest.raises(ConfigError, match="inline table"):
        variants.parse_variants_table("[1]")


def _bench_args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_config_args(p)
    variants.add_options_arg(p)
    p.add_argument("--variants")
    return p.parse_args(list(argv))


def test_benchmark_variants_with_options_and_feedback_iterations(capsys):
    """``--rules LABEL=RULE@K`` + ``--options``: the variant's options go over the config's
    rule_options, ``@K`` sets feedback_iters; the deprecated ``--variants`` gives the same
    runs, its rule_options replacing the config's, with a note."""
    args = _bench_args("--rules", "bp,st=dfa,tp=l-drl@3", "--options", 'st={modules = ["a"]}')
    cfg = load_config(rules=args.rules, rule_options={"seed": 1},
                      feedback_options={"noise": 0.1})
    runs = dict(benchmark.run_configs(args, cfg, "b"))
    assert list(runs) == ["bp", "st", "tp"]
    assert [runs[k].rule for k in runs] == ["bp", "dfa", "l-drl"]
    assert runs["st"].name == "b/st" and runs["st"].rule_options == {"seed": 1, "modules": ["a"]}
    assert runs["bp"].rule_options == {"seed": 1} and runs["bp"].feedback_options == {"noise": 0.1}
    assert runs["tp"].feedback_options == {"noise": 0.1, "feedback_iters": 3}
    old = _bench_args("--variants", '{st = {rule = "dfa", rule_options = {modules = ["a"]}}}')
    (label, run), = benchmark.run_configs(old, cfg, "b")
    assert (label, run.rule, run.rule_options) == ("st", "dfa", {"modules": ["a"]})
    assert "deprecated" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--options"):
        benchmark.run_configs(_bench_args("--variants", '{a = {rule = "fa"}}', "--options",
                                          "a={}"), cfg, "b")


def test_step_time_settings_come_from_a_config_then_the_flags(tmp_path):
    p = step_time.build_parser()
    cfg, fb, vs = step_time._settings(p.parse_args([]))
    assert (cfg.model, cfg.batch_size, cfg.lr, cfg.channels_last) == ("resnet18", 64, 1e-3, False)
    assert fb == {"feedback_optimizer": "sgd", "feedback_lr": 1e-4, "noise": 0.05}
    assert [v.label for v in vs] == ["bp", "fa"] and vs[0].iters == 1
    own = tmp_path / "own.toml"
    own.write_text('model = "lenet"\nrules = ["fa", "t=dtp@2"]\nbatch_size = 8\n'
                   'feedback_options = {noise = 0.2}\n')
    cfg, fb, vs = step_time._settings(p.parse_args(["--config", str(own), "--batch", "4",
                                                    "--compile", "--feedback-lr", "0.5"]))
    assert (cfg.model, cfg.batch_size, cfg.compile, cfg.lr) == ("lenet", 4, True, 0.1)
    assert fb == {"feedback_optimizer": "sgd", "feedback_lr": 0.5, "noise": 0.2}
    assert [(v.label, v.rule, v.iters) for v in vs] == [("fa", "fa", 1), ("t", "dtp", 2)]
    _, _, sweep = step_time._settings(p.parse_args(["--sweep-cpu"]))
    assert [v.label for v in sweep] == ["bp"]
    with pytest.raises(ConfigError, match="--optimizer 'rmsprop'"):
        step_time._settings(p.parse_args(["--optimizer", "rmsprop"]))
