"""RESULTS.md from training logs (recipes.report) and the table runner (recipes.table_runs):
every cell of a table built from small synthetic logs -- mean and spread over seeds, gap to bp
of the same protocol and data copy, "not run", step-time ratio, published number -- the
README block, --check, and a real 1-epoch run that goes from table_runs into the report."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from localopt.recipes import report, table_runs
from localopt.recipes.synthetic import synthetic_arrays, write_imagefolder

pytestmark = pytest.mark.usefixtures("one_thread", "isolated_data_env")

TABLE = table_runs.load_table()
JPEG = "CIFAR-10, JPEG-q75 copy"


def write_log(results: Path, protocol: str, model: str, row: str, seed: int, test_acc: float,
              *, data: str = JPEG, device: str = "cpu (2 cores, 1 torch threads)",
              images_per_s: float = 1000.0, folder: str | None = None, angle: float = 0.0,
              ratio: float = 1.0, drift: float = 0.0, alignment: bool = True,
              finished: bool = True, table: dict | None = None, **settings) -> Path:
    """A log in recipes.train's format for one run of a row of ``table`` (default: the
    table; ``settings`` change its config, as --settings of table_runs does), with one
    per-layer alignment record (as recipes.train writes them: no run name) after each epoch
    unless not ``alignment``: update angles ``angle + drift * (epochs left)``, half that, 0;
    norm ratios ``ratio``, 1, 1.  Without its final record unless ``finished``."""
    it = table_runs.Item(model, row, seed)
    cfg = table_runs.item_config(table or TABLE, protocol, it, settings=settings).to_dict()
    common = {"run": cfg["name"], "model": model, "rule": cfg["rule"], "seed": seed,
              "data": data, "device": device, "git": {"commit": None, "dirty": None}}
    epochs = [{"event": "epoch", "epoch": e, "step": 10 * e, "lr": cfg["lr"], "train_loss": 1.0,
               "train_acc": test_acc + 0.1, "val_loss": 1.0, "val_acc": test_acc - 0.01 * e,
               "test_loss": 1.0 if e == cfg["epochs"] else None,
               "test_acc": test_acc if e == cfg["epochs"] else None, "epoch_time_s": 2.0,
               "images_per_s": images_per_s, **common, "config": cfg}
              for e in range(1, cfg["epochs"] + 1)]
    final = {"event": "final", **{k: epochs[-1][k] for k in ("epoch", "train_loss", "train_acc",
                                                            "val_loss", "val_acc", "test_loss",
                                                            "test_acc")},
             "train_time_s": 2.0 * cfg["epochs"], "images_per_s": images_per_s,
             "best_val_acc": test_acc, **common, "config": cfg, "run_dir": "runs/x"}
    path = (results / model / (folder or protocol) / f"{row}-s{seed}" / "log.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    last = {e["epoch"]: angle + drift * (cfg["epochs"] - e["epoch"]) for e in epochs}
    steps = [{"event": "step", "epoch": e["epoch"], "step": e["step"], "alignment": {
        "update_angle": {"1": last[e["epoch"]], "3": last[e["epoch"]] / 2, "5": 0.0},
        "norm_ratio": {"1": ratio, "3": 1.0, "5": 1.0}}} for e in epochs]
    recs = [{"event": "start", "epoch": 0, **common, "config": cfg},
            *[r for pair in zip(epochs, steps) for r in pair[:1 + alignment]],
            *[final][:finished]]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def table_rows(text: str, heading: str, columns=report.COLUMNS) -> dict[str, dict[str, str]]:
    """The (first) markdown table under the first heading that starts with ``heading``: rule
    -> cells (of its first row: a rule's rows on other data copies follow it)."""
    lines = text.splitlines()
    start = next(i for i, l in enumerate(lines) if l.lstrip("#").strip().startswith(heading))
    rows = {}
    for i, line in enumerate(lines[start + 1:], start + 1):
        if line.startswith("#") or (not line.startswith("|") and lines[i - 1].startswith("|")):
            break
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows.setdefault(cells[0].split("`")[1], dict(zip(columns, cells)))
    return rows


@pytest.fixture
def results(tmp_path) -> Path:
    res = tmp_path / "results"
    for seed, acc in ((0, 0.50), (1, 0.54)):
        write_log(res, "cpu", "mlp3x1024", "bp", seed, acc, images_per_s=1000 + 200 * seed)
    write_log(res, "cpu", "mlp3x1024", "fa", 0, 0.45, angle=80.0)
    write_log(res, "cpu", "mlp3x1024", "dtp", 0, 0.40)
    write_log(res, "cpu", "mlp3x1024", "fa", 1, 0.47, data="CIFAR-10, official copy",
              folder="cpu-official")
    # not the protocol (3 epochs): another group, with its own bp
    write_log(res, "cpu", "mlp3x1024", "bp", 0, 0.30, folder="short", epochs=3)
    write_log(res, "cpu", "mlp3x1024", "drtp", 0, 0.20, folder="short", epochs=3)
    step_time = res / "step_time" / "mlp3x1024_cpu.json"
    step_time.parent.mkdir(parents=True)
    step_time.write_text(json.dumps({"model": "mlp3x1024", "device": "cpu (2 cores)",
                                     "ratio_to_plain": {"plain": 1.0, "bp": 1.02, "fa": 1.1}}))
    # a file that measured fewer rules: the table takes its ratios from the fuller one
    (res / "step_time" / "a_fa_only.json").write_text(json.dumps(
        {"model": "mlp3x1024", "device": "cpu", "ratio_to_plain": {"plain": 1.0, "fa": 9.9}}))
    return res


def _build(results: Path, tmp_path: Path) -> str:
    text, _ = report.build(results, tmp_path / "RESULTS.md", None, results / "figures",
                           write_figs=False)
    return text


def test_every_cell_of_the_protocol_table(results, tmp_path):
    rows = table_rows(_build(results, tmp_path), "Protocol cpu: config mlp_cpu")
    assert list(rows) == table_runs.rows_for(TABLE, "mlp3x1024")   # every row, table order
    bp, fa, dtp = rows["bp"], rows["fa"], rows["dtp"]
    sd = statistics.stdev([50.0, 54.0])
    assert bp["test acc %"] == f"52.00 ± {sd:.2f}" and bp["seeds"] == "0, 1"
    assert bp["gap to bp"] == "ref" and bp["img/s"] == "1100" and bp["epochs"] == "20"
    assert bp["ratio"] == "1.02" and bp["data"] == JPEG and bp["device"].startswith("cpu")
    assert bp["published %"].startswith("58.68 (~500 ep, adam")
    assert fa["test acc %"] == "45.00" and fa["gap to bp"] == "-7.00" and fa["ratio"] == "1.10"
    assert fa["published %"].startswith("58.03")
    assert dtp["test acc %"] == "40.00" and dtp["gap to bp"] == "-12.00"
    for label in ("usf", "kp", "drl"):                 # no log: "not run", nothing typed
        assert rows[label]["test acc %"] == "not run"
        assert all(rows[label][k] == "—" for k in ("gap to bp", "epochs", "img/s", "seeds"))
    assert rows["dfa"]["published %"].startswith("52.20")     # published even when not run
    assert rows["usf"]["published %"] == "—"
    # the same protocol on another data copy is its own row, with no bp to compare to
    text = _build(results, tmp_path)
    other = [l for l in text.splitlines() if "official copy" in l and l.startswith("| `")]
    assert len(other) == 1 and "| 47.00 | — |" in other[0]
    # ... and its own column, named by its data copy, in the per-layer alignment table
    assert (f"| layer | `fa` ({JPEG}) | `fa` (CIFAR-10, official copy) | `dtp` |\n"
            "|---|---:|---:|---:|\n| `1` | 80 / 1 | 0 / 1 | 0 / 1 |") in text
    gpu = table_rows(_build(results, tmp_path), "Protocol gpu: config mlp_gpu")
    assert {c["test acc %"] for c in gpu.values()} == {"not run"}


def test_runs_outside_the_protocols_are_grouped_with_their_own_bp(results, tmp_path):
    text = _build(results, tmp_path)
    rows = table_rows(text, "config mlp_cpu; 3 epochs")
    assert rows["bp"]["test acc %"] == "30.00" and rows["drtp"]["gap to bp"] == "-10.00"
    assert rows["drtp"]["epochs"] == "3"
    assert "results/mlp3x1024/short/drtp-s0/log.jsonl" in text
    resnet = table_rows(text, "Protocol cpu: config resnet20_cpu")
    assert resnet["dfa"]["published %"].startswith("54.06 (250 ep, sgd")  # the SGD number
    assert resnet["dfa-stage"]["published %"] == "—"            # module-wise: not DFA's


def test_readme_block_and_check(results, tmp_path, capsys):
    out, readme = tmp_path / "RESULTS.md", tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{report.BEGIN}\nold\n{report.END}\nafter\n")
    args = ["--results", str(results), "--out", str(out), "--readme", str(readme)]
    assert report.main([*args, "--check"]) == 1             # nothing written yet: stale
    assert report.main([*args, "--no-figures"]) == 0
    assert report.main([*args, "--check"]) == 0
    block = readme.read_text()
    assert block.startswith("# x\n\nbefore\n") and block.endswith(f"{report.END}\nafter\n")
    bp_line = next(l for l in block.splitlines() if l.startswith("| `bp` |"))
    assert bp_line.split("|")[2].strip().startswith("52.00")     # MLP, cpu
    assert bp_line.split("|")[3].strip() == "58.68"              # MLP, published
    assert "gpu" not in block                    # no run of that protocol: RESULTS.md lists it
    write_log(results, "gpu", "mlp3x1024", "fa", 0, 0.46)
    assert report.main([*args, "--no-figures"]) == 0
    head = next(l for l in readme.read_text().splitlines() if l.startswith("| rule |"))
    assert "3x1024 tanh MLP, gpu" in head and "ResNet-20, gpu" in head
    bp_line = next(l for l in readme.read_text().splitlines() if l.startswith("| `bp` |"))
    assert bp_line.split("|")[3].strip() == "not run"            # MLP, gpu
    write_log(results, "cpu", "mlp3x1024", "usf", 0, 0.44)      # a new log: stale again
    assert report.main([*args, "--check"]) == 1
    assert "stale" in capsys.readouterr().err


def test_figures_are_written_and_linked(results, tmp_path):
    out = tmp_path / "RESULTS.md"
    assert report.main(["--results", str(results), "--out", str(out), "--readme", ""]) == 0
    for kind in ("curves", "alignment"):
        png = results / "figures" / "mlp3x1024" / f"cpu-{kind}.png"
        assert png.read_bytes()[:4] == b"\x89PNG"
        assert f"[{kind}](results/figures/mlp3x1024/cpu-{kind}.png)" in out.read_text()
    runs = report.build_rows(report.load_runs(results), TABLE)
    fa = next(r for r in runs if r.group.key == "cpu" and r.variant == "fa" and r.runs)
    assert [a["alignment"]["update_angle"]["1"] for a in fa.runs[0].alignment] == [80.0] * 20


def test_a_seed_shows_the_table_runs_own_run_over_another_with_its_settings(results):
    # an earlier-by-path run with the row's settings but another name (a config file run)
    other = write_log(results, "cpu", "mlp3x1024", "fa", 1, 0.30, folder="a_config_run")
    recs = [json.loads(line) for line in other.read_text().splitlines()]
    for r in recs:
        if "config" in r:
            r["config"]["name"] = "mlp3x1024_aug-mlp3x1024-fa-s1"
    other.write_text("".join(json.dumps(r) + "\n" for r in recs))

    def fa_seed1():
        rows = report.build_rows(report.load_runs(results), TABLE)
        fa = next(r for r in rows if r.group.key == "cpu" and r.variant == "fa"
                  and r.data == JPEG)
        return [r.final["test_acc"] for r in fa.runs if r.info["seed"] == 1]
    assert fa_seed1() == [0.30]        # the only seed-1 run with the row's settings counts
    write_log(results, "cpu", "mlp3x1024", "fa", 1, 0.48)      # table_runs' own run of it
    assert fa_seed1() == [0.48]


def test_a_real_run_from_table_runs_into_the_report(tmp_path):
    data = write_imagefolder(tmp_path / "tiny.tar.gz", synthetic_arrays(n_train=48, n_test=16))
    res = tmp_path / "results"
    settings = (f'{{epochs = 1, val_size = 16, batch_size = 8, eval_batch_size = 16, '
                f'data = "{data}", threads = 1}}')
    args = ["--protocol", "cpu", "--models", "mlp3x1024", "--rules", "bp,kp-wd0", "--seeds", "0",
            "--out-dir", str(tmp_path / "runs"), "--results", str(res), "--no-progress"]
    with pytest.raises(SystemExit):                           # never into the committed results
        table_runs.main([*args[:8], "--settings", settings])
    assert table_runs.main([*args, "--settings", settings]) == 0
    logs = {p.parent.name: p for p in res.glob("mlp3x1024/cpu/*/log.jsonl")}
    assert set(logs) == {"bp-s0", "kp-wd0-s0"}
    finals = {k: [json.loads(l) for l in p.read_text().splitlines()][-1] for k, p in logs.items()}
    start = json.loads(logs["kp-wd0-s0"].read_text().splitlines()[0])
    assert "Local" in start["optimizer"]              # kp's B learns: LocalOptimizer
    text = _build(res, tmp_path)
    # 1 epoch is not the protocol: the runs are listed as the rows they were, with their change
    rows = table_rows(text, "config mlp_cpu; 1 epochs")
    for label in ("bp", "kp-wd0"):
        assert rows[label]["test acc %"] == f"{100 * finals[label + '-s0']['test_acc']:.2f}"
        assert rows[label]["epochs"] == "1" and rows[label]["data"].startswith("CIFAR-10, Image")
    assert table_rows(text, "Protocol cpu: config mlp_cpu")["bp"]["test acc %"] == "not run"


QUALITY_TOML = """
[protocols.screen]
configs = { resnet20 = "resnet20_screen", mlp3x1024 = "mlp_cpu" }
seeds = [0, 1]
device = "cpu"

[rows.bp]
rule = "bp"

[rows.fa]
rule = "fa"
models = ["resnet20"]

[rows.fa-adam]
rule = "fa"
models = ["resnet20"]
settings = { resnet20 = { optimizer = "adam", lr = 1e-3, weight_decay = 0.0 } }

[rows.bp-adam]
rule = "bp"
models = ["resnet20"]
settings = { resnet20 = { optimizer = "adam", lr = 1e-3, weight_decay = 0.0 } }

# another net (projection shortcuts): no bp of its own, so no gap
[rows.fa-b]
rule = "fa"
models = ["resnet20"]
settings = { resnet20 = { model_options = { shortcut = "B", init = "xavier" } } }

[rows.fa-match]
rule = "fa"
models = ["resnet20"]
rule_options = { match_norm = true }

[rows.dfa-stage]
rule = "dfa"
models = ["resnet20"]
rule_options = { modules = ["layers.0", "layers.3"] }
"""


def test_the_training_quality_track_has_its_own_tables(results, tmp_path):
    qpath = tmp_path / "quality.toml"
    qpath.write_text(QUALITY_TOML)
    quality = table_runs.load_table(qpath)

    def log(row, seed, acc, **kw):
        return write_log(results, "screen", "resnet20", row, seed, acc, table=quality, **kw)
    for seed, acc in ((0, 0.40), (1, 0.44)):
        log("bp", seed, acc)                           # angles 0, norm ratios 1
    log("fa", 0, 0.30, angle=60.0, ratio=0.5)
    log("fa-adam", 0, 0.45, angle=30.0, ratio=0.02, drift=40.0)    # the last record counts
    log("bp-adam", 0, 0.50, alignment=False)
    log("fa-match", 0, 0.20, finished=False)         # training: 3 of 3 epochs, no final
    log("fa-b", 0, 0.35, angle=50.0)
    # the quality track's bp of the MLP has the table's cpu settings: it is the table's run
    write_log(results, "screen", "mlp3x1024", "bp", 0, 0.99, table=quality)
    out = tmp_path / "RESULTS.md"
    assert report.main(["--results", str(results), "--out", str(out), "--readme", "",
                        "--quality", str(qpath)]) == 0
    text = out.read_text()
    rows = table_rows(text, "ResNet-20, protocol screen (5 of 7 rows run)",
                      report.QUALITY_COLUMNS)
    assert list(rows) == ["bp", "fa", "fa-adam", "bp-adam", "fa-b", "fa-match", "dfa-stage"]
    sd = statistics.stdev([40.0, 44.0])
    want = {  # test acc, gap to bp with the same optimizer, update angle, norm ratio
        "bp": (f"42.00 ± {sd:.2f}", "ref", "0.0", "1"),
        "fa": ("30.00", "-12.00", "30.0", "0.5"),               # to bp (sgd): 30 - 42
        "fa-adam": ("45.00", "-5.00", "15.0", "0.02"),          # to bp-adam: 45 - 50
        "bp-adam": ("50.00", "ref", "—", "—"),                  # no alignment logged
        "fa-b": ("35.00", "—", "25.0", "1"),                    # bp (sgd) is another net
        "fa-match": ("unfinished (epoch 3/3)", "—", "—", "—"),
        "dfa-stage": ("not run", "—", "—", "—")}
    for label, (acc, gap, angle, ratio) in want.items():
        c = rows[label]
        assert (c["test acc %"], c["gap to bp"], c["update angle"], c["norm ratio"]) == \
            (acc, gap, angle, ratio), label
    assert [rows[k]["rule"] for k in rows] == ["bp", "fa", "fa", "bp", "fa", "fa", "dfa"]
    assert rows["fa"]["optimizer"] == "sgd, lr 0.1" and rows["fa"]["rule options"] == "—"
    assert rows["bp-adam"]["optimizer"] == "adam, lr 0.001, weight_decay 0"
    assert rows["fa-b"]["rule options"] == "model_options {shortcut=B}"
    assert rows["fa-b"]["optimizer"] == "sgd, lr 0.1"
    assert rows["fa-match"]["rule options"] == "{match_norm=True}"
    assert rows["dfa-stage"]["rule options"] == "{modules=[layers.0, layers.3]}"
    # the paragraph above the table: config, epochs, same-optimizer gaps, the command
    para = text[text.index("### ResNet-20, protocol screen"):text.index("| row |")]
    assert "`recipes/configs/resnet20_screen.toml` (3 epochs), seeds 0, 1" in para
    assert "gaps are to `bp` with the same optimizer" in para
    assert (f"`python -m recipes.table_runs --table {qpath} --protocol screen "
            "--models resnet20`") in para
    # the section sits between the per-model tables and the published numbers
    assert (text.index("### Other runs (3x1024") < text.index("## Training-quality track")
            < text.index("### ResNet-20, protocol screen") < text.index("## Published"))
    # the MLP's bp: a run of the table's cpu bp row (a second seed-0 run: the first by path
    # counts), shown, not moved, in the quality table
    mlp = table_rows(text, "3x1024 tanh MLP, protocol screen (1 of 1 rows run)",
                     report.QUALITY_COLUMNS)
    assert mlp["bp"]["row"] == "`bp` (= table `cpu` `bp`)"
    assert mlp["bp"]["test acc %"] == f"52.00 ± {statistics.stdev([50.0, 54.0]):.2f}"
    assert table_rows(text, "Protocol cpu: config mlp_cpu")["bp"]["test acc %"] == \
        mlp["bp"]["test acc %"]
    # none of those runs is among the other runs; without the quality track they are
    assert "screen/" not in text and "Other runs (ResNet-20)" not in text
    assert set(table_rows(text, "config mlp_cpu; 3 epochs")) == {"bp", "drtp"}
    text, _ = report.build(results, out, None, results / "figures", write_figs=False,
                           quality_path=None)
    assert "Training-quality" not in text and "Other runs (ResNet-20)" in text
    assert "results/resnet20/screen/fa-s0/log.jsonl" in text
    # figures of the quality protocol, linked under its table
    for kind in ("curves", "alignment"):
        png = results / "figures" / "resnet20" / f"quality-screen-{kind}.png"
        assert png.read_bytes()[:4] == b"\x89PNG"
        assert f"[{kind}](results/figures/resnet20/quality-screen-{kind}.png)" in \
            out.read_text()


def layer_table(text: str, heading: str):
    """(sentence, column heads, {layer: cells}) of the per-layer alignment table in the
    section under the first heading that starts with ``heading``; None when it has none."""
    lines = text.splitlines()
    start = next(i for i, l in enumerate(lines) if l.lstrip("#").strip().startswith(heading))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("#")),
               len(lines))
    section = lines[start + 1:end]
    at = next((i for i, l in enumerate(section) if l.startswith("**Per-layer alignment**")),
              None)
    if at is None:
        return None
    assert section[at + 1] == "" and section[at + 2].startswith("| layer |")
    assert section[at + 3] == "|---|" + "---:|" * (section[at + 2].count("|") - 2)
    body = {}
    for line in section[at + 4:]:
        if not line.startswith("| `"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        body[cells[0].strip("`")] = cells[1:]
    head = [c.strip() for c in section[at + 2].strip("|").split("|")][1:]
    return section[at], head, body


def _edit_steps(path: Path, edit) -> None:
    """Rewrite a log's records with ``edit(records) -> records``."""
    recs = [json.loads(l) for l in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(r) + "\n" for r in edit(recs)))


def test_per_layer_alignment_tables(tmp_path):
    res = tmp_path / "results"
    for seed in (0, 1):
        write_log(res, "cpu", "mlp3x1024", "bp", seed, 0.50)        # 0 degrees: left out
    logs = {"fa": [write_log(res, "cpu", "mlp3x1024", "fa", s, 0.45, angle=a, ratio=r)
                   for s, a, r in ((0, 80.0, 0.5), (1, 60.0, 0.3))],        # 2 seeds: mean
            "dtp": [write_log(res, "cpu", "mlp3x1024", "dtp", 0, 0.40, angle=30.0,
                              ratio=0.0123, drift=10.0)],         # the last record counts
            "dfa": [write_log(res, "cpu", "mlp3x1024", "dfa", 0, 0.40, angle=70.0,
                              ratio=2.345)],
            "kp": [write_log(res, "cpu", "mlp3x1024", "kp", 0, 0.40, angle=50.0,
                             ratio=123.0)]}
    write_log(res, "cpu", "mlp3x1024", "usf", 0, 0.40, alignment=False)    # no column

    def without_3(recs):                          # dfa never logged layer "3"
        for r in recs:
            for values in r.get("alignment", {}).values():
                values.pop("3")
        return recs

    def with_2_one_record_less(recs):   # kp: layers "1", "2", "3" (no run logged all
        for r in recs:                  # four); its last record an epoch before the others'
            for key, values in r.get("alignment", {}).items():
                layers = {}
                for name, value in values.items():
                    if name != "5":
                        layers[name] = value
                    if name == "1":
                        layers["2"] = 7.0 if key == "update_angle" else 0.25
                r["alignment"][key] = layers
        last = max(i for i, r in enumerate(recs) if "alignment" in r)
        return recs[:last] + recs[last + 1:]
    _edit_steps(logs["dfa"][0], without_3)
    _edit_steps(logs["kp"][0], with_2_one_record_less)
    qpath = tmp_path / "quality.toml"
    qpath.write_text(QUALITY_TOML)
    quality = table_runs.load_table(qpath)
    write_log(res, "screen", "resnet20", "bp", 0, 0.40, table=quality)
    write_log(res, "screen", "resnet20", "bp-adam", 0, 0.50, table=quality, angle=5.0)
    qfa = write_log(res, "screen", "resnet20", "fa", 0, 0.30, table=quality, angle=60.0,
                    ratio=0.5)
    out = tmp_path / "RESULTS.md"
    assert report.main(["--results", str(res), "--out", str(out), "--readme", "",
                        "--quality", str(qpath), "--no-figures"]) == 0
    text = out.read_text()

    def check(table, logs):
        """Every cell against the logs: mean over a row's runs of the last record's values."""
        sentence, head, body = table
        lasts = {label: [[r for r in map(json.loads, p.read_text().splitlines())
                          if "alignment" in r][-1] for p in paths]
                 for label, paths in logs.items()}
        assert [h.split("`")[1] for h in head] == list(logs)
        for label, h in zip(logs, head):
            (step,) = {r["step"] for r in lasts[label]}     # said once, or per column
            assert f"; step {step}, " in sentence or f"(step {step}, " in h, (label, h)
            if len(lasts[label]) > 1:
                assert f"{len(lasts[label])} seeds" in h
        for i, label in enumerate(logs):
            for layer, cells in body.items():
                recs = [r["alignment"] for r in lasts[label]]
                angles = [a["update_angle"][layer] for a in recs if layer in a["update_angle"]]
                ratios = [a["norm_ratio"][layer] for a in recs if layer in a["norm_ratio"]]
                if not angles:
                    assert cells[i] == "—", (label, layer)
                    continue
                angle, ratio = cells[i].split(" / ")
                assert angle == f"{statistics.fmean(angles):.0f}", (label, layer)
                assert float(ratio) == float(f"{statistics.fmean(ratios):.2g}"), (label, layer)
        return body

    table = layer_table(text, "Protocol cpu: config mlp_cpu")
    sentence, head, body = table
    # table order, bp and the rows without alignment (usf) or runs left out
    want = [r for r in table_runs.rows_for(TABLE, "mlp3x1024") if r in logs]
    body = check(table, {label: logs[label] for label in want})
    assert list(body) == ["1", "2", "3", "5"]                       # the order logged
    cols = {label: i for i, label in enumerate(want)}
    assert body["1"][cols["fa"]] == "70 / 0.4"                      # (80 + 60) / 2
    assert body["3"][cols["fa"]] == "35 / 1" and body["5"][cols["fa"]] == "0 / 1"
    assert body["1"][cols["dtp"]] == "30 / 0.012"
    assert body["3"][cols["dfa"]] == "—" and body["2"][cols["dfa"]] == "—"
    assert body["1"][cols["dfa"]] == "70 / 2.3"
    assert body["1"][cols["kp"]] == "50 / 120" and body["2"][cols["kp"]] == "7 / 0.25"
    assert body["5"][cols["kp"]] == "—"
    assert head[cols["fa"]] == "`fa` (step 200, epoch 20, 2 seeds)"
    assert head[cols["kp"]] == "`kp` (step 190, epoch 19)"       # the steps differ
    assert "update angle in degrees between the rule's weight gradient and backprop's" in \
        sentence and "the step under each column" in sentence and "mean over the seeds" \
        in sentence
    # after the group's table
    section = text[text.index("### Protocol cpu: config mlp_cpu"):]
    assert section.index("| `bp` |") < section.index("**Per-layer alignment**") < \
        section.index("### Protocol gpu")
    assert layer_table(text, "Protocol gpu: config mlp_gpu") is None       # nothing run
    # the quality track: bp-adam left out; one step for all: said once
    table = layer_table(text, "ResNet-20, protocol screen")
    check(table, {"fa": [qfa]})
    sentence, head, body = table
    assert head == ["`fa`"] and body["1"] == ["60 / 0.5"] and "(`diagnostics_every`; " \
        "step 30, epoch 3)" in sentence and "seeds" not in sentence
    assert layer_table(text, "3x1024 tanh MLP, protocol screen") is None   # only bp
    assert layer_table(text, "Protocol cpu: config resnet20_cpu") is None  # nothing run
    # the function itself: "" when no row but bp logged alignment
    rows = report.build_rows(report.load_runs(res), TABLE)
    assert report.layer_alignment_markdown([r for r in rows if r.variant == "bp"]) == ""


def test_run_summary_lists_each_run_with_its_last_alignment(results, capsys):
    fa = results / "mlp3x1024" / "cpu" / "fa-s0"
    assert report.main(["--runs", str(fa), str(results / "nothing-here")]) == 0
    out = capsys.readouterr().out
    assert "| fa-s0 | fa | CIFAR-10, JPEG-q75 copy |" in out and "| 45.00 | 1000 |" in out
    assert "**fa-s0** (step 200, epoch 20)" in out and "| 1 | - | 80.0 | - |" in out


def test_benchmark_variants_name_rules_with_options():
    from localopt.recipes.benchmark import parse_variants
    from localopt.recipes.common import ConfigError
    v = parse_variants('{bp = {rule = "bp"}, stage = {rule = "dfa", rule_options = '
                       '{modules = ["layers.0"]}}}')
    assert v == {"bp": {"rule": "bp", "rule_options": {}},
                 "stage": {"rule": "dfa", "rule_options": {"modules": ["layers.0"]}}}
    for bad in ('{x = {rules = "bp"}}', '{x = "bp"}', '{x = {rule = "bp", lr = 1}}', "{x ="):
        with pytest.raises(ConfigError, match="--variants"):
            parse_variants(bad)


def test_committed_results_md_is_up_to_date_with_the_logs():
    """RESULTS.md and README.md's table are regenerated whenever a log, the table or the
    published numbers change (python -m recipes.report)."""
    assert report.main(["--check"]) == 0


def test_step_time_ratio_of_a_row_with_options_or_its_own_optimizer(results, tmp_path):
    """A row with rule options or its own optimizer (``fa-best``: fa init="weight" with Muon;
    ``dfa-stage``) takes its ratio from a ``--variants-from`` file that timed it by its label
    with the same rule, options and optimizer -- never from a same-named variant of another
    definition, nor from its plain rule's ratio; a plain row only from a file that timed the
    rule with the row's options."""
    def write(name: str, variants: dict, optimizer: str = "sgd(lr=0.001)") -> None:
        (results / "step_time" / name).write_text(json.dumps(
            {"model": "resnet20", "device": "cpu", "optimizer": optimizer,
             "ratio_to_plain": {"plain": 1.0, **{k: v.pop("ratio") for k, v in variants.items()}},
             "variants": variants}))
    stage = {"modules": ["layers.0", "layers.3", "layers.6"]}
    write("table_resnet20.json", {
        "fa": {"rule": "fa", "options": {}, "ratio": 1.05},
        "fa-best": {"rule": "fa", "options": {"init": "weight"}, "optimizer": "muon",
                    "ratio": 1.12},
        "dfa-stage": {"rule": "dfa", "options": {"modules": ["layers.0"]}, "ratio": 7.0},
        "bp-muon": {"rule": "bp", "options": {}, "ratio": 8.0},        # timed with sgd
        "dkp": {"rule": "dkp", "options": {}, "ratio": 0.5}})  # the row names feedback=channel
    write("other_resnet20.json", {"dfa-stage": {"rule": "dfa", "options": stage, "ratio": 0.97}})
    rows = table_rows(_build(results, tmp_path), "Protocol cpu: config resnet20_cpu")
    assert rows["fa"]["ratio"] == "1.05" and rows["fa-best"]["ratio"] == "1.12"
    assert rows["dfa-stage"]["ratio"] == "0.97"   # the file whose options are the row's
    assert rows["bp-muon"]["ratio"] == "—"        # timed with another optimizer
    assert rows["dkp"]["ratio"] == "—"            # a plain rule timed with other options


def _edit_log(path: Path, edit) -> None:
    recs = [json.loads(l) for l in path.read_text().splitlines()]
    for r in recs:
        edit(r)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_a_diverged_run_is_shown_as_diverged_never_as_an_accuracy(results, tmp_path):
    """A run whose loss rose past 3x its first epoch's (an older log), or whose final record
    says recipes.train stopped it, has no result: the cell says diverged, with seed and
    epoch; a row with other seeds keeps their accuracy beside it."""
    rise = write_log(results, "cpu", "mlp3x1024", "dfa", 0, 0.30)
    _edit_log(rise, lambda r: r.update(train_loss=3.5) if r.get("epoch", 0) >= 4
              and r["event"] in ("epoch", "final") else None)
    stopped = write_log(results, "cpu", "mlp3x1024", "bdfa", 0, 0.30)
    _edit_log(stopped, lambda r: r.update(test_acc=None, diverged={
        "epoch": 7, "step": 65, "loss": float("nan"), "start_loss": 2.3})
        if r["event"] == "final" else None)
    write_log(results, "cpu", "mlp3x1024", "bdfa", 1, 0.33)
    rows = table_rows(_build(results, tmp_path), "Protocol cpu: config mlp_cpu")
    assert rows["dfa"]["test acc %"] == "**diverged** (seed 0: epoch 4)"
    assert rows["dfa"]["gap to bp"] == "—" and rows["dfa"]["seeds"] == "—"
    assert rows["bdfa"]["test acc %"] == "33.00; **diverged** (seed 0: epoch 7)"
    assert rows["bdfa"]["seeds"] == "1"
    readme = tmp_path / "README.md"                      # the README's summary says so too
    readme.write_text(f"{report.BEGIN}\n{report.END}\n")
    assert report.main(["--results", str(results), "--out", str(tmp_path / "R.md"),
                        "--readme", str(readme), "--no-figures"]) == 0
    lines = readme.read_text().splitlines()
    dfa_line = next(l for l in lines if l.startswith("| `dfa` |"))
    assert dfa_line.split("|")[2].strip() == "diverged"          # MLP, cpu
    bdfa_line = next(l for l in lines if l.startswith("| `bdfa` |"))
    assert bdfa_line.split("|")[2].strip() == "33.00; seed 0 diverged"


def test_best_validation_epoch_column(results, tmp_path):
    """Test accuracy at the epoch of best validation accuracy: the final record's; for older
    logs, the last epoch's when it had the best validation accuracy, else "—"."""
    up = write_log(results, "cpu", "mlp3x1024", "usf", 0, 0.40)   # val rises: best is last
    _edit_log(up, lambda r: r.update(val_acc=0.3 + 0.001 * r["epoch"])
              if r["event"] == "epoch" else None)
    given = write_log(results, "cpu", "mlp3x1024", "frsf", 0, 0.40)
    _edit_log(given, lambda r: r.update(test_acc_at_best_val=0.42, best_val_epoch=3)
              if r["event"] == "final" else None)
    rows = table_rows(_build(results, tmp_path), "Protocol cpu: config mlp_cpu")
    assert rows["usf"]["at best val"] == "40.00" and rows["frsf"]["at best val"] == "42.00"
    assert rows["fa"]["at best val"] == "—"           # its best validation was epoch 1
