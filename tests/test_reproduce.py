"""tools/reproduce.py and the grid / report modules behind it."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, write

from dksgraph.experiments import grid as grid_lib
from dksgraph.experiments import report
from dksgraph.errors import DksError
from dksgraph.spec import parse_spec
from dksgraph.train.trainer import Trainer
from dksgraph.train.runconfig import RunConfig

TOY = f"""
name: toy
specs: [{ROOT / 'specs' / 'resnet32.yaml'}]
methods: [baseline, dks]
seeds: [0]
train: {{dataset: synthetic, num_classes: 10, epochs: 2, batch_size: 16, limit_train_batches: 2}}
"""


def reproduce(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "reproduce.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=1800)


def test_toy_grid_runs_resumes_nothing_twice_and_reports_the_runs_metrics(tmp_path):
    grid_file = write(tmp_path / "toy.yaml", TOY)
    first = reproduce(grid_file, "--runs-dir", "runs", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2 runs in runs (0 done, 0 eval, 0 resume, 2 new)" in first.stdout
    runs = grid_lib.plan(grid_lib.load_grid(grid_file), grid_file, tmp_path / "runs")
    assert [r.id for r in runs] == ["resnet32-baseline-s0", "resnet32-dks-s0"]
    stamps = {p: p.stat().st_mtime_ns for r in runs for p in r.folder.iterdir()}

    second = reproduce(grid_file, "--runs-dir", "runs", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "(2 done, 0 eval, 0 resume, 0 new)" in second.stdout
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # no run was touched

    text = (tmp_path / "runs" / "report.md").read_text()
    finals = {r.id: json.loads((r.folder / "final.json").read_text()) for r in runs}
    for r in runs:
        history = [json.loads(line) for line in (r.folder / "metrics.jsonl").read_text().splitlines()]
        assert len(history) == 2 and finals[r.id]["epoch"] == 2
        assert f"| {r.id} | 2 | {finals[r.id]['test/acc1/main']:.2f} |" in text
    base, dks = (100 - finals[k]["test/acc1/main"] for k in ("resnet32-baseline-s0", "resnet32-dks-s0"))
    assert f"| resnet32 | {base:.2f} | {dks:.2f} | {base - dks:+.2f} |" in text
    for name in ("main", "c2", "c3", "ensemble"):
        assert f"{name}: {finals['resnet32-dks-s0'][f'test/acc1/{name}']:.2f}" in text


def test_an_interrupted_run_resumes_from_its_last_checkpoint(tmp_path):
    grid_file = write(tmp_path / "toy.yaml", TOY.replace("methods: [baseline, dks]", "methods: [dks]"))
    (run,) = grid_lib.plan(grid_lib.load_grid(grid_file), grid_file, tmp_path / "runs")
    grid_lib.prepare(run)

    def interrupt(epoch, step):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # stops in epoch 2
        Trainer(parse_spec(run.spec), RunConfig(out=str(run.folder), limit_train_batches=2), on_step=interrupt).fit()
    epoch1 = (run.folder / "metrics.jsonl").read_text()
    assert grid_lib.status(run) == "resume"

    done = reproduce(grid_file, "--runs-dir", "runs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(0 done, 0 eval, 1 resume, 0 new)" in done.stdout
    assert grid_lib.status(run) == "done"
    lines = (run.folder / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and lines[0] + "\n" == epoch1
    assert "--resume" in (run.folder / "train.log").read_text()


def test_changed_settings_are_refused_instead_of_mixed(tmp_path):
    grid_file = write(tmp_path / "toy.yaml", TOY)
    (run, _) = grid_lib.plan(grid_lib.load_grid(grid_file), grid_file, tmp_path / "runs")
    grid_lib.prepare(run)
    bigger = grid_lib.with_budget(grid_lib.load_grid(grid_file), train_subset=100)
    (changed, _) = grid_lib.plan(bigger, grid_file, tmp_path / "runs")
    with pytest.raises(DksError, match="other settings"):
        grid_lib.status(changed)


def test_bad_grids_exit_2_with_the_problem_named(tmp_path):
    bad = write(tmp_path / "bad.yaml", TOY.replace("seeds:", "sedes:"))
    out = reproduce(bad, cwd=tmp_path)
    assert out.returncode == 2 and "sedes" in out.stderr and "Traceback" not in out.stderr
    missing = reproduce(tmp_path / "nope.yaml", cwd=tmp_path)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    folder = write(tmp_path / "folder.yaml", TOY.replace("dataset: synthetic", "dataset: imagefolder, "
                                                          "data_dir: no/such/dir"))
    out = reproduce(folder, cwd=tmp_path)
    assert out.returncode == 2 and "no/such/dir" in out.stderr and not (tmp_path / "runs").exists()


def test_variants_select_taps_and_pairs_and_epochs_scale_milestones(tmp_path):
    grid = grid_lib.Grid(name="g", specs=[str(ROOT / "specs" / "resnet32.yaml")], methods=["baseline", "dks"],
                         variants=[{"name": "C1C2", "taps": ["c2"]}, {"name": "TD", "pairs": "top_down"}],
                         train={"epochs": 20})
    runs = grid_lib.plan(grid, tmp_path / "g.yaml", tmp_path)
    assert [r.id for r in runs] == ["resnet32-baseline-s0", "resnet32-C1C2-dks-s0", "resnet32-TD-dks-s0"]
    assert [t["name"] for t in runs[1].spec["taps"]] == ["c2"]
    assert runs[2].spec["synergy"]["pairs"] == "top_down"
    assert runs[0].spec["train"]["schedule"]["milestones"] == [6, 12, 18]  # 60/120/180 of 200 epochs -> of 20
    with pytest.raises(DksError, match=r"\['c9'\]"):
        grid_lib.plan(grid.model_copy(update={"variants": [grid_lib.Variant(name="x", taps=["c9"])]}),
                      tmp_path / "g.yaml", tmp_path)


@pytest.mark.parametrize("path", sorted((ROOT / "specs" / "grids").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_grid_plans(path, tmp_path):
    grid = grid_lib.load_grid(path)
    runs = grid_lib.plan(grid, path, tmp_path)
    assert runs and len({r.id for r in runs}) == len(runs) and grid.cost


def test_mean_std_strings():
    assert report.mean_std([7.51, 7.69, 7.62]) == "7.61(0.09)"
    assert report.mean_std([30.0, 31.0]) == "30.50(0.71)"
    assert report.mean_std([5.0]) == "5.00"
    assert report.mean_std([]) == "–"
    assert report.mean_std([1.234, 1.236], digits=1) == "1.2(0.0)"


def _result(tmp_path, arm, seed, accs, seconds, train_acc=50.0):
    method = arm.partition("_at_")[0]
    run = grid_lib.Run(tmp_path, "net", "", method, seed, tmp_path / f"{arm}{seed}", {"train": {"epochs": 1}}, arm=arm)
    final = {f"test/acc1/{k}": v for k, v in accs.items()}
    return report.Result(run, [{"epoch": 1, "train/seconds": seconds, "test/seconds": 6.0, "train/acc1/main": train_acc,
                                "test/acc1/main": accs["main"]}], final)


def test_tables_from_fixed_metrics(tmp_path):
    results = [_result(tmp_path, "baseline", 0, {"main": 70.0}, 10.0), _result(tmp_path, "baseline", 1, {"main": 72.0}, 12.0),
               _result(tmp_path, "dks", 0, {"main": 73.0, "c2": 60.0}, 22.0),
               _result(tmp_path, "dks", 1, {"main": 75.0, "c2": 62.0}, 22.0)]
    errors = report.error_table(results, ["baseline", "dks"])
    assert "| net | 29.00(1.41) | 26.00(1.41) | +3.00 |" in errors
    assert "| net | DKS | 2 | main: 74.00(1.41), c2: 61.00(1.41) |" in report.classifier_table(results)
    assert "| net | baseline | 2 | main: 71.00(1.41) |" in report.classifier_table(results)
    assert "| net | DKS | 1 | 0.4(0.0) | 22.00(0.00) | 2.00 | 0.5(0.0) |" in report.time_table(results)


def test_paired_differences_and_the_generalisation_gap_by_hand(tmp_path):
    results = [_result(tmp_path, "baseline", s, {"main": a}, 10.0, train_acc=99.0) for s, a in enumerate([40.0, 42.0, 41.0])]
    results += [_result(tmp_path, "dks", s, {"main": a}, 24.0, train_acc=96.0) for s, a in enumerate([41.0, 45.0, 40.0])]
    results += [_result(tmp_path, "baseline_at_dks_time", s, {"main": a}, 24.0) for s, a in enumerate([43.0, 43.0])]
    table = report.paired_table(results, [("dks", "baseline"), ("dks", "baseline_at_dks_time")])
    # dks - baseline errors: (59-60, 55-58, 60-59) = (-1, -3, +1): mean -1, sd 2, se 2 / sqrt(3) = 1.1547
    assert "| net | DKS − baseline | -1.00 | -3.00 | +1.00 | -1.00 | 1.15 | 2/3 |" in table
    # the equal-compute baseline has no seed 2: two pairs, (59-57, 55-57) = (+2, -2)
    assert "| net | DKS − baseline at DKS's time | +2.00 | -2.00 | – | +0.00 | 2.00 | 1/2 |" in table
    gaps = report.gap_table(results, ["baseline", "dks"])
    assert "| net | baseline | 99.00(0.00) | 41.00(1.00) | 58.00(1.00) |" in gaps
    assert "| net | DKS | 96.00(0.00) | 42.00(2.65) | 54.00(2.65) |" in gaps
    text = report.markdown("t", "", results, ["baseline", "dks", "baseline_at_dks_time"], [], [("dks", "baseline")])
    assert "## Paired differences, seed by seed" in text and "| net | 59.00(1.00) | 58.00(2.65) | 57.00(0.00) |" in text


def test_equal_compute_arm_trains_the_baseline_for_the_measured_time_ratio(tmp_path):
    grid = grid_lib.Grid(name="g", specs=[str(ROOT / "specs" / "resnet32.yaml")], seeds=[0, 1],
                         equal_compute={"matches": "dks", "time_ratio": 2.38}, train={"epochs": 20})
    runs = grid_lib.plan(grid, tmp_path / "g.yaml", tmp_path)
    assert grid.arms == ["baseline", "ds", "dks", "baseline_at_dks_time"]
    assert grid.comparisons == [("dks", "baseline"), ("dks", "ds"), ("dks", "baseline_at_dks_time")]
    long = [r for r in runs if r.arm == "baseline_at_dks_time"]
    assert [r.id for r in long] == ["resnet32-baseline_at_dks_time-s0", "resnet32-baseline_at_dks_time-s1"]
    assert long[0].spec["train"]["epochs"] == 48 and long[0].spec["train"]["method"] == "baseline" and long[0].shared
    assert long[0].spec["train"]["schedule"]["milestones"] == [14, 29, 43]  # 60/120/180 of 200 epochs -> of 48
    assert report.arm_name("baseline_at_dks_time") == "baseline at DKS's time"
    shorter = grid_lib.plan(grid_lib.with_budget(grid, epochs=2), tmp_path / "g.yaml", tmp_path)
    assert {r.spec["train"]["epochs"] for r in shorter if r.arm == "baseline_at_dks_time"} == {5}  # 2.38 x 2
    with pytest.raises(ValueError, match="not an arm"):
        grid_lib.Grid(name="g", specs=["x.yaml"], compare=[["dks", "sdn"]])


def test_paired_runs_share_initial_backbone_weights_and_data_order(tmp_path):
    """Seed s gives baseline, DS and DKS the same backbone initialisation and the same batches."""
    spec = parse_spec({"backbone": {"model": "zoo:resnet32", "kwargs": {"num_classes": 10}, "input_size": [3, 32, 32]},
                       "taps": "auto", "train": {"dataset": "synthetic", "batch_size": 8, "seed": 3}})
    firsts = {}
    for method in ("baseline", "dks"):
        trainer = Trainer(spec.model_copy(update={"train": spec.train.model_copy(update={"method": method})}),
                          RunConfig(out=str(tmp_path / method), device="cpu"))
        trainer.train_batches.set_epoch(1, 0)
        firsts[method] = (trainer.model.backbone.state_dict(), next(iter(trainer.train_batches)))
    (w_base, (x_base, y_base)), (w_dks, (x_dks, y_dks)) = firsts["baseline"], firsts["dks"]
    assert w_base.keys() == w_dks.keys() and all(torch.equal(w_base[k], w_dks[k]) for k in w_base)
    assert torch.equal(x_base, x_dks) and torch.equal(y_base, y_dks)


@pytest.mark.slow
def test_run_records_rebuild_the_report_and_are_reused_by_a_later_grid(tmp_path):
    grid_file = write(tmp_path / "toy.yaml", TOY)
    first = reproduce(grid_file, "--runs-dir", "runs", "--report-dir", "results", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    records = tmp_path / "results" / "runs"
    assert sorted(p.name for p in (records / "resnet32-dks-s0").iterdir()) == sorted(grid_lib.RECORD_FILES)
    report_text = (tmp_path / "results" / "report.md").read_text()

    later = write(tmp_path / "later.yaml", TOY.replace("methods: [baseline, dks]", "methods: [baseline, ds, dks]")
                  + "reuse: [results/runs]\n")
    again = reproduce(later, "--runs-dir", "later-runs", "--dry-run", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 finished run(s) taken from the records" in again.stdout and "(2 done, 0 eval, 0 resume, 1 new)" in again.stdout
    assert "new    resnet32-ds-s0" in again.stdout

    rebuilt = reproduce(grid_file, "--runs-dir", "elsewhere", "--reuse", records, "--report-only", "--report-dir",
                        "rebuilt", cwd=tmp_path)
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    table = report_text[report_text.index("## Top-1 error"):report_text.index("## Training time")]
    assert table in (tmp_path / "rebuilt" / "report.md").read_text()
    assert not (tmp_path / "elsewhere").exists()  # nothing trained


def _interruptible():
    """Start with Ctrl-C's default action, as a terminal's foreground job does, even when the tests
    themselves run in the background of a shell (which starts them with SIGINT ignored)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.faults
def test_ctrl_c_stops_the_grid_and_the_next_invocation_goes_on(tmp_path):
    import signal
    import time

    slower = TOY.replace("epochs: 2", "epochs: 3").replace("limit_train_batches: 2", "limit_train_batches: 40")
    grid_file = write(tmp_path / "toy.yaml", slower)
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "reproduce.py"), str(grid_file), "--runs-dir",
                             "runs"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_interruptible)
    first = tmp_path / "runs" / "resnet32-baseline-s0" / "last.pt"
    deadline = time.time() + 600  # a safety net: the first epoch takes seconds
    while not first.exists() and time.time() < deadline and proc.poll() is None:  # let the first run save once
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted; run the same command again" in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "resnet32-dks-s0" / "last.pt").exists()  # the next run never started

    again = reproduce(grid_file, "--runs-dir", "runs", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(0 done, 0 eval, 1 resume, 1 new)" in again.stdout
    assert "(2 done" in reproduce(grid_file, "--runs-dir", "runs", "--dry-run", cwd=tmp_path).stdout
