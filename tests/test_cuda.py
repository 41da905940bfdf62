"""CUDA checks (`pytest -m cuda`), skipped where PyTorch sees no GPU; `tools/gpu_check.sh` runs them.

Every other test runs on the CPU even on a GPU machine (see conftest.py), so that the suite means
the same everywhere; these are the ones that need the GPU.
"""

import json

import pytest
import torch

from conftest import write
from dksgraph.deploy import strip
from dksgraph.checkpoint import load_checkpoint
from dksgraph.train.device_data import random_crop_flip
from dksgraph.train.trainer import Trainer
from test_device_data import crop_params, probe_images
from test_train import TOY, config, interrupted_run, toy
from test_train_runtime import torchrun

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("amp, channels_last", [("fp16", False), ("bf16", True)])
def test_amp_trains_and_strips(tmp_path, amp, channels_last):
    trainer = Trainer(toy(epochs=1), config(tmp_path / amp, device="cuda", amp=amp, channels_last=channels_last))
    history = trainer.fit()
    assert trainer.device.type == "cuda" and torch.isfinite(torch.tensor(history[0]["train/total"]))
    ckpt = load_checkpoint(tmp_path / amp / "last.pt")
    assert (ckpt["scaler"] is not None) == (amp == "fp16")
    strip(tmp_path / amp / "last.pt")


def test_compile_trains_and_reports_compile_time_apart(tmp_path):
    trainer = Trainer(toy(epochs=1), config(tmp_path / "c", device="cuda", compile=True, amp="bf16",
                                            channels_last=True))
    record = trainer.fit()[0]
    assert record["train/first_step_s"] > 0 and record["train/images_per_s"] > 0
    strip(tmp_path / "c" / "last.pt")


def test_one_process_nccl_ddp_with_sync_bn(tmp_path):
    write(tmp_path / "toy.yaml", json.dumps(TOY))
    done = torchrun(["train", "toy.yaml", "--epochs", 1, "--limit-train-batches", 3, "--out", "ddp", "--device",
                     "cuda", "--sync-bn", "--amp", "bf16", "--collective-timeout", 45], tmp_path, nproc=1,
                    env={"CUDA_VISIBLE_DEVICES": "0"}, timeout=90)  # below the GPU check's budget for the tests
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "on cuda:0 x1" in done.stdout and "DDP over 1 processes" in done.stdout and "SyncBatchNorm" in done.stdout
    strip(tmp_path / "ddp" / "last.pt")


def test_resume_gpu_to_cpu_and_cpu_to_gpu(run, tmp_path):
    interrupted_run(tmp_path / "g", device="cuda", amp="fp16")
    to_cpu = run("train", "--resume", "g/last.pt", "--device", "cpu", "--amp", "none")
    assert to_cpu.exit_code == 0, to_cpu.output
    interrupted_run(tmp_path / "c", device="cpu")
    to_gpu = run("train", "--resume", "c/last.pt", "--device", "cuda")
    assert to_gpu.exit_code == 0, to_gpu.output
    for folder in ("g", "c"):
        assert load_checkpoint(tmp_path / folder / "last.pt")["epoch"] == 2


def test_a_gpu_checkpoint_evaluates_on_cpu_as_on_the_gpu(run, tmp_path):
    interrupted_run(tmp_path / "g", device="cuda", amp="fp16", channels_last=True)
    on_cpu = run("eval", "g/last.pt", "--device", "cpu", "--json", "cpu.json")
    on_gpu = run("eval", "g/last.pt", "--device", "cuda", "--json", "gpu.json")
    assert on_cpu.exit_code == on_gpu.exit_code == 0, on_cpu.output + on_gpu.output
    cpu, gpu = (json.loads((tmp_path / f).read_text()) for f in ("cpu.json", "gpu.json"))
    for name in ("main", "c2", "c3", "ensemble"):  # full precision on both; kernels may round differently
        assert abs(cpu[f"test/acc1/{name}"] - gpu[f"test/acc1/{name}"]) <= 100 * 2 / 256, name


def test_data_on_device_trains_on_the_gpu_with_torchvisions_distribution(tmp_path):
    n = 8000
    crops = random_crop_flip(probe_images(n).cuda(), 4, torch.Generator(device="cuda").manual_seed(0))
    top, left, flipped = (t.cpu() for t in crop_params(crops))
    for axis in (top, left):
        assert ((axis.bincount(minlength=9) / n) - 1 / 9).abs().max() < 0.02
    assert abs(flipped.float().mean() - 0.5) < 0.02
    spec = toy(epochs=1).model_copy()
    spec = spec.model_copy(update={"train": spec.train.model_copy(update={"augmentation": "cifar"})})
    trainer = Trainer(spec, config(tmp_path / "d", device="cuda", data_on_device=True, channels_last=True))
    assert trainer.train_batches.images.is_cuda
    trainer.fit()
    strip(tmp_path / "d" / "last.pt")
