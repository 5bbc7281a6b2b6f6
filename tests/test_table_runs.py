"""recipes.table_runs' settings: the recipes' config flags and --settings over each protocol's
config; settings that change what is trained need --results (never the committed results)."""
from __future__ import annotations

import pytest

from localopt.recipes import table_runs
from localopt.recipes.common import ConfigError, load_config

BASE = ["--protocol", "cpu", "--models", "mlp3x1024", "--rules", "bp,fa", "--seeds", "0"]


def plan(*argv: str):
    return table_runs.plan(table_runs.build_parser().parse_args([*BASE, *argv]))


def test_flags_and_settings_set_every_run_over_the_protocol_config(tmp_path):
    res = str(tmp_path / "res")
    by_flags = plan("--epochs", "2", "--lr", "0.05", "--augment", "false", "--results", res)[1]
    by_settings = plan("--settings", "{epochs = 2, lr = 0.05, augment = false}",
                       "--results", res)[1]
    assert [it.id for it in by_flags] == ["mlp3x1024/bp/s0", "mlp3x1024/fa/s0"]
    for it, cfg in by_flags.items():
        assert cfg == by_settings[it]
        assert (cfg.epochs, cfg.lr, cfg.augment, cfg.rule, cfg.seed) == (2, 0.05, False,
                                                                           it.row, 0)
        assert cfg.config_name == "mlp_cpu"
    # a flag goes over --settings
    cfgs = plan("--settings", "{epochs = 2}", "--epochs", "4", "--results", res)[1]
    assert {c.epochs for c in cfgs.values()} == {4}


def test_machine_settings_keep_the_committed_results_folder(tmp_path):
    results, cfgs = plan("--device", "cpu", "--threads", "1", "--compile", "--out-dir",
                         str(tmp_path / "runs"), "--data", str(tmp_path / "d.tar.gz"))
    assert results == table_runs.RESULTS
    protocol = load_config("mlp_cpu")
    for cfg in cfgs.values():
        assert (cfg.device, cfg.threads, cfg.compile) == ("cpu", 1, True)
        assert cfg.out_dir == str(tmp_path / "runs") and cfg.epochs == protocol.epochs
    assert {c.out_dir for c in plan()[1].values()} == {"runs"}     # the default


@pytest.mark.parametrize("argv, named", [
    (["--epochs", "1"], "--epochs"),
    (["--settings", "{val_size = 16, device = \"cpu\"}"], "--val-size"),
    (["--settings", "{batch_size = 8}", "--lr", "0.1"], "--batch-size, --lr"),
])
def test_training_settings_need_results(argv, named):
    with pytest.raises(ConfigError, match=f"^{named} \\(--settings or flags\\) change what"):
        plan(*argv)


def test_cli_errors_exit_2_with_the_option(capsys):
    for argv, named in ((["--epochs", "1"], "--epochs"),
                        (["--settings", "{epochs ="], "--settings"),
                        (["--settings", "3", "--results", "x"], "--settings '3'"),
                        # the table sets the rule options of each row: no such flag
                        (["--rule-options", "{}"], "unrecognized arguments: --rule-options")):
        with pytest.raises(SystemExit) as e:
            table_runs.main([*BASE, "--list", *argv])
        assert e.value.code == 2
        assert named in capsys.readouterr().err
