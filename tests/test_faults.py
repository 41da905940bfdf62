"""What survives what: kills, preemption, full disks, two runs in one folder, broken files, a dead rank.

Fault tests wait for events (a file appearing, a process ending), not for fixed sleeps; their
timeouts are safety nets, ten times what the work takes or more. The slow ones are marked `faults`
(`make test` runs them; `pytest -m "not faults"` skips them).
"""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, image_folder, write
from dksgraph.checkpoint import atomic_write, load_checkpoint, save_checkpoint
from dksgraph.errors import WriteError
from test_train import TOY, config, toy
from test_train_runtime import free_port

RUN = ["--epochs", "2", "--limit-train-batches", "4", "--limit-eval-batches", "1", "--save-every", "1"]

# a dksgraph command line whose checkpoint writes take 0.3 s, so that a kill can land inside one
SLOW_WRITES = """
import sys, time
import dksgraph.checkpoint as checkpoint

real = checkpoint.atomic_write


def slow(path, write, *args, **kwargs):
    def slowly(f):
        write(f)
        f.flush()
        time.sleep(0.3)
    return real(path, slowly, *args, **kwargs)


checkpoint.atomic_write = slow
from dksgraph.cli import main

sys.argv = ["dksgraph", *sys.argv[1:]]
main()
"""


def env():
    return {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": ""}


def dksgraph(tmp_path, *args, slow_writes=False):
    driver = write(tmp_path / "slow_writes.py", SLOW_WRITES) if slow_writes else None
    cmd = [sys.executable, str(driver)] if driver else [sys.executable, "-m", "dksgraph"]
    return subprocess.Popen([*cmd, *map(str, args)], cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(predicate, timeout=300.0, what="the event"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def weights(path):
    return load_checkpoint(path)["model"]


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def reference(tmp_path_factory):
    """The final weights of the uninterrupted run that every fault test must reproduce."""
    folder = tmp_path_factory.mktemp("reference")
    write(folder / "toy.yaml", json.dumps(TOY))
    code, out, err = finish(dksgraph(folder, "train", "toy.yaml", "--out", "r", *RUN))
    assert code == 0, err[-3000:]
    return weights(folder / "r" / "last.pt")


# ------------------------------------------------------------------------------------------ kill -9 at any moment

@pytest.mark.faults
def test_kill_9_at_any_moment_then_resume_gives_the_uninterrupted_weights(tmp_path, reference):
    write(tmp_path / "toy.yaml", json.dumps(TOY))
    rng = random.Random(0)
    kills = {"in a write": 0, "at a random moment": 0}
    for trial in range(20):
        out = tmp_path / f"t{trial}"
        proc = dksgraph(tmp_path, "train", "toy.yaml", "--out", out.name, *RUN, slow_writes=True)
        if trial % 2 == 0:  # the moment a checkpoint write is under way
            wait_for(lambda: proc.poll() is not None or any(out.glob(".last.pt.*.tmp")), what="a checkpoint write")
            kills["in a write"] += proc.poll() is None
        else:
            time.sleep(rng.uniform(0.5, 6.0))
            kills["at a random moment"] += proc.poll() is None
        proc.kill()
        proc.wait(timeout=60)
        last = out / "last.pt"
        while True:  # resume until the run is done, as a user would
            if last.exists():
                ckpt = load_checkpoint(last)  # a killed write never leaves a last.pt that does not load
                if ckpt["epoch"] == 2:
                    break
                args = ["train", "--resume", last]
            else:
                args = ["train", "toy.yaml", "--out", out.name, "--overwrite", *RUN]
            code, _, err = finish(dksgraph(tmp_path, *args))
            assert code == 0, err[-3000:]
        assert same_weights(weights(last), reference), trial
        assert not list(out.glob(".*.tmp")) and not (out / "run.lock").exists()
    assert kills["in a write"] >= 5 and kills["at a random moment"] >= 5, kills


# ------------------------------------------------------------------------------------------ SIGTERM, SIGINT

def test_sigterm_mid_epoch_saves_the_position_and_the_resume_is_bit_identical(tmp_path):
    from dksgraph.checkpoint import checkpoint_spec
    from dksgraph.train.runconfig import RunConfig
    from dksgraph.train.trainer import Preempted, Trainer

    reference = Trainer(toy(), config(tmp_path / "a", limit_train_batches=4))
    reference.fit()

    def preempt(epoch, step):
        if (epoch, step) == (1, 1):
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Preempted) as stopped:
        Trainer(toy(), config(tmp_path / "b", limit_train_batches=4), on_step=preempt).fit()
    assert stopped.value.exit_code == 143 and "epoch 2, after step 2" in str(stopped.value)
    ckpt = load_checkpoint(tmp_path / "b" / "last.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 2)
    resumed = Trainer(checkpoint_spec(ckpt, "b"), RunConfig.from_dict(ckpt["config"]), resume=ckpt)
    resumed.fit()
    a, b = reference.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["train/total"] for r in reference.history] == [r["train/total"] for r in resumed.history]


def test_a_signal_the_process_was_started_ignoring_stays_ignored(tmp_path):
    """A shell starts background jobs with SIGINT ignored; training must not turn Ctrl-C back on."""
    from dksgraph.train.trainer import Trainer

    def interrupt(epoch, step):
        if (epoch, step) == (0, 1):
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        trainer = Trainer(toy(), config(tmp_path / "r", limit_train_batches=2), on_step=interrupt)
        assert len(trainer.fit()) == trainer.recipe.epochs
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.mark.faults
def test_sigterm_to_the_command_line_exits_143_with_the_resume_command(tmp_path, reference):
    write(tmp_path / "toy.yaml", json.dumps(TOY))
    proc = dksgraph(tmp_path, "train", "toy.yaml", "--out", "r", *RUN)
    last = tmp_path / "r" / "last.pt"
    wait_for(lambda: last.exists() or proc.poll() is not None, what="the first checkpoint")
    proc.send_signal(signal.SIGTERM)
    code, _, err = finish(proc)
    assert code == 143, err[-2000:]
    assert "stopped by SIGTERM" in err and "dksgraph train --resume r/last.pt" in err and "Traceback" not in err
    code, _, err = finish(dksgraph(tmp_path, "train", "--resume", "r/last.pt"))
    assert code == 0, err[-3000:]
    assert same_weights(weights(last), reference)


# ------------------------------------------------------------------------------------------ full disks, write errors

def small_disk(path: Path, size: str):
    """A tmpfs of ``size`` at ``path`` (root only); False when it cannot be mounted here."""
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


def test_a_full_disk_stops_the_run_with_the_path_and_keeps_the_last_checkpoint(run, tmp_path, monkeypatch):
    disk = tmp_path / "disk"
    mounted = small_disk(disk, "700k")
    try:
        if not mounted:  # no tmpfs here: the file system says "no space" on the second checkpoint
            import dksgraph.checkpoint as checkpoint

            real, writes = checkpoint.os.fsync, []

            def fsync(fd):
                writes.append(fd)
                if len(writes) > 3:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real(fd)

            monkeypatch.setattr(checkpoint.os, "fsync", fsync)
        write(tmp_path / "toy.yaml", json.dumps(TOY))
        result = run("train", "toy.yaml", "--out", "disk/r", *RUN)
        flat = " ".join(result.output.split())
        assert result.exit_code == 2 and "No space left on device" in flat and "disk/r/" in flat, flat[-1500:]
        assert "Traceback" not in result.output
        assert load_checkpoint(disk / "r" / "last.pt")["step"] == 1  # the first checkpoint is intact
        assert not list((disk / "r").glob(".*.tmp")) and not (disk / "r" / "run.lock").exists()
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=False)


def test_a_write_error_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "ro" / "last.pt"
    atomic_write(target, lambda f: f.write(b"old"))

    def failing(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(WriteError, match="could not write .* No space left on device"):
        atomic_write(target, failing)
    assert target.read_bytes() == b"old" and [p.name for p in target.parent.iterdir()] == ["last.pt"]


@pytest.mark.parametrize("fmt", ["state_dict", "exported", "onnx", "torchscript"])
def test_an_export_that_cannot_be_written_names_the_path_and_leaves_nothing(tmp_path, fmt):
    import dksgraph

    model = dksgraph.augment(toy())
    name = model.classifiers[1]
    blocked = tmp_path / "a-file"
    blocked.write_bytes(b"")
    with pytest.raises(WriteError, match="could not write"):  # its folder is a file
        dksgraph.export(model, blocked / f"{name}.out", name, fmt)
    disk = tmp_path / "disk"
    if not small_disk(disk, "16k"):
        pytest.skip("no tmpfs here for the full-disk half")
    try:
        with pytest.raises(WriteError, match="No space left on device"):
            dksgraph.export(model, disk / f"{name}.out", name, fmt)
        assert not list(disk.iterdir())  # no temp file, no sidecar
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_checkpoints_get_the_umasks_permissions(tmp_path):
    old = os.umask(0o002)
    try:
        save_checkpoint(tmp_path / "c.pt", toy(), torch.nn.Linear(1, 1))
    finally:
        os.umask(old)
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == 0o664


# ------------------------------------------------------------------------------------------ one run per folder

def test_a_second_run_on_the_same_folder_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    write(tmp_path / "toy.yaml", json.dumps(TOY))
    first = dksgraph(tmp_path, "train", "toy.yaml", "--out", "r", "--epochs", "50", "--limit-eval-batches", "1")
    lock = tmp_path / "r" / "run.lock"
    wait_for(lambda: lock.exists() or first.poll() is not None, what="the first run's lock")
    code, _, err = finish(dksgraph(tmp_path, "train", "toy.yaml", "--out", "r", "--overwrite", *RUN))
    flat = " ".join(err.split())
    assert code == 2 and f"in use by another `dksgraph train`: pid {first.pid}" in flat, flat[-1500:]
    first.kill()
    first.wait(timeout=60)
    assert lock.exists()  # left behind by the killed run
    code, _, err = finish(dksgraph(tmp_path, "train", "toy.yaml", "--out", "r", "--overwrite", *RUN))
    assert code == 0, err[-3000:]
    assert f"took over r/run.lock from pid {first.pid}" in err and not lock.exists()


# ------------------------------------------------------------------------------------------ broken files

def test_a_truncated_last_checkpoint_names_the_file_and_offers_best(run, tmp_path):
    write(tmp_path / "toy.yaml", json.dumps(TOY))
    assert run("train", "toy.yaml", "--out", "r", "--epochs", 2, "--limit-train-batches", 2,
               "--limit-eval-batches", 1).exit_code == 0
    last = tmp_path / "r" / "last.pt"
    data = last.read_bytes()
    last.unlink()  # a new file: best.pt, a link to an earlier last.pt, keeps its own bytes
    last.write_bytes(data[: len(data) // 2])
    result = run("train", "--resume", "r/last.pt")
    flat = " ".join(result.output.split())
    assert result.exit_code == 2 and "`r/last.pt` is damaged at its end" in flat
    assert "`r/best.pt` (epoch" in flat and "--resume r/best.pt" in flat and "Traceback" not in flat


@pytest.mark.parametrize("data_on_device", [False, True])
def test_a_corrupt_image_stops_the_run_with_its_path_or_is_skipped(run, tmp_path, data_on_device):
    image_folder(tmp_path / "data", per_class=8, suffix=".jpg", corrupt=Path("train/b/3.jpg"))
    write(tmp_path / "toy.yaml", json.dumps({**TOY, "train": {**TOY["train"], "dataset": "imagefolder",
                                                              "data_dir": "data", "batch_size": 4}}))
    device = ["--data-on-device"] if data_on_device else []
    result = run("train", "toy.yaml", "--out", "r", "--epochs", 1, *device)
    flat = " ".join(result.output.split())
    assert result.exit_code == 2 and "cannot read the image `data/train/b/3.jpg`" in flat and "Traceback" not in flat
    assert "--skip-bad-images" in flat and not (tmp_path / "r" / "last.pt").exists()
    result = run("train", "toy.yaml", "--out", "r2", "--epochs", 1, "--skip-bad-images", *device)
    assert result.exit_code == 0, result.output
    if not data_on_device:
        assert "1 unreadable images skipped" in result.output
        assert load_checkpoint(tmp_path / "r2" / "last.pt")["history"][0]["train/skipped_images"] == 1


# ------------------------------------------------------------------------------------------ a dead rank

@pytest.mark.faults
def test_when_one_rank_dies_the_other_exits_within_the_timeout(tmp_path):
    spec = {**TOY, "backbone": {**TOY["backbone"], "model": "toynets:pid_net"}}
    write(tmp_path / "toy.yaml", json.dumps(spec))
    (tmp_path / "pids").mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "dksgraph", "train", "toy.yaml", "--epochs", "200", "--limit-eval-batches", "1", "--out", "ddp",
           "--device", "cpu", "--collective-timeout", "20"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env={**env(), "DKS_TEST_PIDS": str(tmp_path / "pids")},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = [tmp_path / "pids" / f"rank{r}.pid" for r in (0, 1)]
    wait_for(lambda: all(p.exists() and p.read_text() for p in pids) or proc.poll() is not None, what="both ranks")
    wait_for(lambda: (tmp_path / "ddp" / "metrics.jsonl").exists() or proc.poll() is not None, what="training")
    os.kill(int(pids[1].read_text()), signal.SIGKILL)
    killed = time.time()
    code, _, err = finish(proc, timeout=600)
    assert code != 0 and time.time() - killed < 20 + 60, err[-2000:]  # the collective timeout, plus teardown
    survivor = int(pids[0].read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(survivor, 0)


# ------------------------------------------------------------------------------------------ spec fuzzing

FUZZ_SPECS = ["resnet32", "densenet40", "wrn28_4", "mobilenet"]


def _paths(data, prefix=()):
    if isinstance(data, dict):
        for k, v in data.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield (*prefix, i)
            yield from _paths(v, (*prefix, i))


def _mutate(data, path, kind, value):
    *parents, last = path
    holder = data
    for p in parents:
        holder = holder[p]
    if kind == "delete":
        del holder[last]
    elif kind == "extra" and isinstance(holder, dict):
        holder[f"{last}_x"] = value
    else:
        holder[last] = value


@pytest.mark.faults
def test_fuzzed_specs_exit_0_or_2_never_a_traceback_and_write_nothing_on_2(tmp_path):
    import yaml
    from click.testing import CliRunner
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from dksgraph.cli import cli

    nested = {"a": {"a": {"a": {"a": {"a": {"a": {"a": [[[[1]]]]}}}}}}}
    values = st.sampled_from([None, True, -1, 0, 1.5, -7.25, 10**12, -10**12, 2**63, 1e308, float("nan"), "",
                              "ü漢字🙂", "x" * 300, [], [1, 2, 3], {}, {"k": "v"}, nested, "auto", "layer2"])
    sources = {name: yaml.safe_load((ROOT / "specs" / f"{name}.yaml").read_text()) for name in FUZZ_SPECS}

    @settings(max_examples=120, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(st.sampled_from(FUZZ_SPECS), st.data(), st.sampled_from(["set", "delete", "extra"]), values)
    def check(name, data, kind, value):
        spec = json.loads(json.dumps(sources[name]))
        path = data.draw(st.sampled_from(list(_paths(spec))))
        _mutate(spec, path, kind, value)
        folder = Path(tmp_path) / "case"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        write(folder / "s.yaml", yaml.safe_dump(spec, allow_unicode=True))
        runner = CliRunner()
        cwd = os.getcwd()
        os.chdir(folder)
        try:
            for args in (["augment", "s.yaml", "--save", "out.pt"], ["inspect", "s.yaml"]):
                result = runner.invoke(cli, args)
                assert result.exit_code in (0, 2), (path, kind, value, result.output[-1500:], result.exc_info)
                assert "Traceback" not in result.output
                if result.exit_code == 2:
                    assert not (folder / "out.pt").exists()
        finally:
            os.chdir(cwd)

    check()



def _torchrun_train(launcher: list, out: str) -> list:
    return [sys.executable, "-m", "torch.distributed.run", *map(str, launcher), "-m", "dksgraph", "train", "toy.yaml",
            "--epochs", "1", "--limit-train-batches", "3", "--limit-eval-batches", "1", "--out", out]


@pytest.mark.faults
def test_finished_distributed_runs_exit_0_every_time_on_a_busy_machine(tmp_path):
    """30 back-to-back 2-process runs and a 2-node one (two torchrun agents), a CPU hog beside them: every launch
    exits 0 (a gloo process group left alive at interpreter exit used to abort a rank now and then)."""
    write(tmp_path / "toy.yaml", json.dumps(TOY))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    failed = []
    try:
        for i in range(30):
            done = subprocess.run(_torchrun_train(["--nproc-per-node", 2, "--master-port", free_port()], f"r{i}"),
                                  cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                failed.append((i, done.returncode, done.stderr[-1500:]))
        two_nodes = ["--nnodes", 2, "--nproc-per-node", 1, "--rdzv-backend", "c10d", "--rdzv-endpoint",
                     f"localhost:{free_port()}", "--rdzv-id", "two-nodes"]
        agents = [subprocess.Popen(_torchrun_train(two_nodes, "two"), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True) for _ in range(2)]
        for agent in agents:
            out, _ = agent.communicate(timeout=600)
            if agent.returncode != 0:
                failed.append(("2 nodes", agent.returncode, out[-1500:]))
    finally:
        hog.kill()
    assert not failed, failed
    assert load_checkpoint(tmp_path / "two" / "last.pt")["epoch"] == 1
