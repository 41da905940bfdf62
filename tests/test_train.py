import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from conftest import ROOT, write
from dksgraph.errors import DksError
from dksgraph.spec import apply_overrides, parse_spec
from dksgraph.deploy import strip
from dksgraph.checkpoint import load_checkpoint, checkpoint_spec
from dksgraph.train.trainer import Trainer
from dksgraph.train.runconfig import RunConfig

TOY = {"name": "toy", "backbone": {"model": "toynets:drop_net", "kwargs": {"num_classes": 10},
                                   "input_size": [3, 32, 32]},
       "train": {"dataset": "synthetic", "epochs": 2, "batch_size": 16, "optimizer": {"lr": 0.05},
                 "schedule": {"name": "multistep", "milestones": [1], "gamma": 0.5}}}


def toy(**recipe):
    """The toy spec with recipe overrides (see dksgraph.spec.apply_overrides)."""
    return apply_overrides(parse_spec(TOY), **recipe)


def config(out, **kw):
    base = dict(out=str(out), limit_train_batches=3, limit_eval_batches=1, log_every=1)
    base.update(kw)
    return RunConfig(**base)


@pytest.mark.parametrize("method", ["dks", "ds", "baseline", "byot", "dhm", "sdn"])
def test_one_epoch_per_method_writes_checkpoints_and_metrics(run, tmp_path, method):
    result = run("train", ROOT / "specs" / "resnet32.yaml", "--method", method, "--dataset", "synthetic",
                 "--num-classes", 10, "--epochs", 1, "--batch-size", 16, "--limit-train-batches", 2,
                 "--limit-eval-batches", 1, "--out", "run")
    assert result.exit_code == 0, result.output
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["format"] == "dksgraph/1" and ckpt["epoch"] == 1 and ckpt["method"] == method
    assert (tmp_path / "run" / "best.pt").exists()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["epoch"] == 1
    classifiers = ["main"] if method == "baseline" else ["main", "c2", "c3", "ensemble"]
    for name in classifiers:
        assert 0 <= records[0][f"test/acc1/{name}"] <= 100
    assert ("train/synergy/main->c2" in records[0]) == (method in ("dks", "dhm", "byot"))
    assert ("train/synergy/c2->main" in records[0]) == (method in ("dks", "dhm"))
    assert ("train/hint/c2" in records[0]) == (method == "byot")
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header == list(records[0])
    stripped = run("strip", "run/last.pt", "-o", "r32.pt")  # every method's checkpoint strips
    assert stripped.exit_code == 0, stripped.output
    evaluated = run("eval", "run/last.pt", "--limit-eval-batches", 1)
    assert evaluated.exit_code == 0, evaluated.output
    assert all(name in evaluated.output for name in classifiers)


@pytest.mark.parametrize("objective", [{}, {"train": {"method": "sdn"}},
                                       {"train": {"method": "dhm"}, "synergy": {"pair_drop": 0.5}},
                                       {"train": {"method": "byot"}}], ids=["dks", "sdn", "dhm-drop", "byot"])
def test_interrupt_and_resume_is_bit_identical(tmp_path, objective):
    """Weights ramped per step (sdn), pairs dropped per step (dhm) and hint adapters (byot) resume exactly too."""
    spec = parse_spec({**TOY, **objective, "train": {**TOY["train"], **objective.get("train", {})}})
    reference = Trainer(spec, config(tmp_path / "a"))
    reference.fit()

    def interrupt(epoch, step):
        if (epoch, step) == (1, 1):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(spec, config(tmp_path / "b"), on_step=interrupt).fit()
    ckpt = load_checkpoint(tmp_path / "b" / "last.pt")
    assert ckpt["epoch"] == 1
    resumed = Trainer(checkpoint_spec(ckpt, "b"), RunConfig.from_dict(ckpt["config"]), resume=ckpt)
    resumed.fit()
    a, b = reference.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["train/total"] for r in reference.history] == [r["train/total"] for r in resumed.history]


def interrupted_run(folder, spec=None, at=(1, 0), **runtime):
    """A run folder whose last.pt holds the first epoch(s) of a run stopped at step ``at``."""
    def interrupt(epoch, step):
        if (epoch, step) == at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(spec or toy(), config(folder, **runtime), on_step=interrupt).fit()
    return folder / "last.pt"


def test_resume_from_the_cli(run, tmp_path):
    interrupted_run(tmp_path / "r")
    result = run("train", "--resume", "r/last.pt", "--epochs", 2)  # the run's own value: accepted
    assert result.exit_code == 0, result.output
    assert "from epoch 2 to epoch 2" in result.output
    assert load_checkpoint(tmp_path / "r" / "last.pt")["epoch"] == 2
    assert len((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) == 2


def test_existing_run_folder_is_refused_without_overwrite(run, tmp_path):
    write(tmp_path / "toy.yaml", json.dumps(TOY))
    args = ["toy.yaml", "--epochs", 1, "--limit-train-batches", 1, "--limit-eval-batches", 1, "--out", "r"]
    assert run("train", *args).exit_code == 0
    before = (tmp_path / "r" / "last.pt").read_bytes()
    refused = run("train", *args)
    assert refused.exit_code == 2 and "already holds a run" in refused.output
    assert (tmp_path / "r" / "last.pt").read_bytes() == before
    assert run("train", *args, "--overwrite").exit_code == 0


def test_non_finite_loss_stops_with_epoch_and_step(tmp_path):
    def poison(epoch, step):
        if (epoch, step) == (1, 0):
            with torch.no_grad():
                trainer.model.backbone.fc.weight.fill_(float("nan"))

    trainer = Trainer(toy(), config(tmp_path / "n"), on_step=poison)
    with pytest.raises(DksError, match=r"NaN or infinite at epoch 2, step 2.*last good checkpoint"):
        trainer.fit()
    assert load_checkpoint(tmp_path / "n" / "last.pt")["epoch"] == 1


def test_two_process_gloo_ddp_run_strips_bit_exactly(tmp_path):
    write(tmp_path / "toy.yaml", json.dumps(TOY))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
           "-m", "dksgraph", "train", "toy.yaml", "--epochs", "1", "--limit-train-batches", "3", "--limit-eval-batches",
           "2", "--out", "ddp", "--device", "cpu"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "on cpu x2" in done.stdout
    ckpt = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert ckpt["metrics"]["test/acc1/main"] >= 0
    strip(tmp_path / "ddp" / "last.pt")  # raises unless bit-exact


CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.mark.skipif(not CIFAR.exists(), reason="../shared/data/cifar10-jpeg.tar.gz is not here")
def test_a_few_steps_on_real_cifar10_lower_the_training_loss(tmp_path):
    with tarfile.open(CIFAR) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(("train/", "test/")) and (
            not m.isfile() or int(Path(m.name).stem) < 60)]
        tar.extractall(tmp_path / "cifar", members=members, filter="data")
    spec = parse_spec({"backbone": {"model": "zoo:resnet32", "kwargs": {"num_classes": 10},
                                    "input_size": [3, 32, 32]},
                       "train": {"optimizer": {"lr": 0.05}, "augmentation": "none", "dataset": "imagefolder",
                                 "data_dir": str(tmp_path / "cifar"), "epochs": 4, "batch_size": 32}})
    trainer = Trainer(spec, config(tmp_path / "c", limit_train_batches=None, limit_eval_batches=1))
    history = trainer.fit()
    losses = [r["train/total"] for r in history]
    assert losses[-1] < losses[0] * 0.9, losses


def test_warmup_ramps_per_step_and_leaves_the_schedule_alone(tmp_path):
    spec = toy(warmup_epochs=1, lr=0.1)
    seen = []
    trainer = Trainer(spec, config(tmp_path / "w", limit_train_batches=4))
    trainer.on_step = lambda e, s: seen.append(round(trainer.scheduler.get_last_lr()[0], 6))
    lrs = [round(trainer.optimizer.param_groups[0]["lr"], 6)]
    trainer.fit()
    # the rate each step used: the first is set before it, each later one after the step before
    assert lrs + seen[:-1] == [0.025, 0.05, 0.075, 0.1, 0.05, 0.05, 0.05, 0.05]
    assert [r["lr"] for r in trainer.history] == [0.025, 0.05]


def test_bf16_autocast_and_channels_last_on_cpu(tmp_path):
    trainer = Trainer(toy(epochs=1), config(tmp_path / "amp", amp="bf16", channels_last=True))
    history = trainer.fit()
    assert math.isfinite(history[0]["train/total"])
    strip(tmp_path / "amp" / "last.pt")


def test_fp16_without_cuda_is_refused(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    with pytest.raises(DksError, match="needs a CUDA GPU"):
        Trainer(toy(), config(tmp_path / "x", amp="fp16", device="cpu"))


def test_off_a_terminal_the_log_has_a_line_every_n_steps_and_no_bar(tmp_path):
    write(tmp_path / "toy.yaml", json.dumps(TOY))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    with open(tmp_path / "train.log", "w") as log:  # stdout and stderr a file, as under nohup or a scheduler
        done = subprocess.run([sys.executable, "-m", "dksgraph", "train", "toy.yaml", "--epochs", "2", "--batch-size",
                               "4", "--limit-train-batches", "12", "--limit-eval-batches", "3", "--print-every", "5",
                               "--out", "run", "--device", "cpu"], cwd=tmp_path, env=env, stdout=log,
                              stderr=subprocess.STDOUT, timeout=300)
    text = (tmp_path / "train.log").read_text()
    assert done.returncode == 0, text[-3000:]
    assert "\r" not in text and "it/s" not in text and "batch/s" not in text
    progress = [line.split(" [")[0] for line in text.splitlines() if line.startswith("epoch ") and "/12" in line]
    assert [p.split(" loss=")[0] for p in progress] == ["epoch 1/2: 5/12", "epoch 1/2: 10/12", "epoch 2/2: 5/12",
                                                         "epoch 2/2: 10/12"]
    assert all(" loss=" in p and " acc=" in p for p in progress)
    assert sum(line.startswith("epoch 1: loss") for line in text.splitlines()) == 1  # one line per epoch


def test_eval_every_scores_every_nth_epoch_and_the_last(tmp_path):
    trainer = Trainer(toy(epochs=5), config(tmp_path / "r", eval_every=2))
    history = trainer.fit()
    assert [("test/acc1/main" in r) for r in history] == [False, True, False, True, True]
    best = load_checkpoint(tmp_path / "r" / "best.pt")
    assert best["epoch"] in (2, 4, 5)
    csv_rows = (tmp_path / "r" / "metrics.csv").read_text().splitlines()
    assert len(csv_rows) == 6
