"""tools/reproduce.py and the grid / report modules behind it."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, write

from dksgraph import grid as grid_lib
from dksgraph import report
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


def test_tables_from_fixed_metrics(tmp_path):
    def result(method, seed, accs, seconds):
        run = grid_lib.Run(tmp_path, "net", "", method, seed, tmp_path / f"{method}{seed}", {"train": {"epochs": 1}})
        final = {f"test/acc1/{k}": v for k, v in accs.items()}
        return report.Result(run, [{"epoch": 1, "train/seconds": seconds, "train/acc1/main": 50.0,
                                    "test/acc1/main": accs["main"]}], final)

    results = [result("baseline", 0, {"main": 70.0}, 10.0), result("baseline", 1, {"main": 72.0}, 12.0),
               result("dks", 0, {"main": 73.0, "c2": 60.0}, 22.0), result("dks", 1, {"main": 75.0, "c2": 62.0}, 22.0)]
    errors = report.error_table(results, ["baseline", "dks"])
    assert "| net | 29.00(1.41) | 26.00(1.41) | +3.00 |" in errors
    assert "| net | DKS | 2 | main: 74.00(1.41), c2: 61.00(1.41) |" in report.classifier_table(results)
    assert "| net | DKS | 0.4(0.0) | 22.0(0.0) | 2.00 |" in report.time_table(results)


def _interruptible():
    """Start with Ctrl-C's default action, as a terminal's foreground job does, even when the tests
    themselves run in the background of a shell (which starts them with SIGINT ignored)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


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
