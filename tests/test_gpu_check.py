"""tools/gpu_check.sh --dry-run: the GPU check's every step, on the CPU, so that it cannot rot."""

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR.exists(), reason="../shared/data/cifar10-jpeg.tar.gz is not here")
def test_gpu_check_dry_run_installs_offline_and_runs_every_step(tmp_path):
    wheels = tmp_path / "wheels"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    made = subprocess.run([sys.executable, str(ROOT / "tools" / "wheels.py"), "--dest", str(wheels), "--python",
                           version], capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stderr[-2000:]
    out = tmp_path / "check"
    done = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--dry-run", "--python", sys.executable,
                           "--wheels", str(wheels), "--cifar", str(CIFAR), "--out", str(out)],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"results in {out} (summary.md)" in done.stdout
    summary = (out / "summary.md").read_text()
    assert "failed steps: none" in summary and "7 skipped" in summary  # the cuda tests skip on the CPU
    table = [line for line in summary.splitlines() if line.startswith(("zoo:resnet32", "torchvision:resnet50"))]
    assert len(table) == 9 and {line.split()[4] for line in table} == {"loader", "device", "synthetic"}
    for run in ("resnet32-baseline-s0", "resnet32-ds-s0", "resnet32-dks-s0"):
        assert f"| {run} | 1 |" in summary and "10000 test images" in summary
    assert (out / "evidence" / "report.md").is_file() and not (out / "data").exists()
    assert Path(out / "venv" / "bin" / "dksgraph").is_file()  # installed from the checkout, offline
