"""tools/gpu_check.sh --dry-run: the GPU check's every step, on the CPU, so that it cannot rot.

The check runs with a "host" Python built like the GPU server's: PyTorch, torchvision and what they need,
nothing of dksgraph's own requirements (no pytest, no pydantic), and a PyTorch whose declared pins the host does
not satisfy (as a server's CUDA build pins triton, nvidia-* and sympy exactly), no network for the installer.
"""

import importlib.metadata as metadata
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
CHECK = ROOT / "tools" / "gpu_check.sh"
UNSATISFIED_PIN = "sympy==0.0.1"  # declared by the host's torch, satisfied by nothing installed

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not CIFAR.exists(), reason="../shared/data/cifar10-jpeg.tar.gz is not here")]


def _closure(names: list[str]) -> list[metadata.Distribution]:
    """The installed distributions ``names`` need at run time (extras left out), themselves included."""
    seen, todo, found = set(), list(names), []
    while todo:
        key = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(key)
        except metadata.PackageNotFoundError:
            continue  # a requirement for another platform or Python
        found.append(dist)
        for req in dist.requires or []:
            if "extra ==" not in req:
                todo.append(re.match(r"[A-Za-z0-9_.-]+", req).group(0))
    return found


@pytest.fixture(scope="module")
def host_python(tmp_path_factory) -> Path:
    """A venv whose site-packages holds (as links) only torch, torchvision and their own requirements, with
    torch's metadata declaring UNSATISFIED_PIN."""
    home = tmp_path_factory.mktemp("host")
    subprocess.run([sys.executable, "-m", "venv", str(home)], check=True, capture_output=True)
    python = home / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    for dist in _closure(["torch", "torchvision"]):
        base = Path(dist.locate_file(""))
        for top in sorted({Path(str(f)).parts[0] for f in dist.files or []} - {"..", "__pycache__"}):
            source, target = base / top, site / top
            if not source.exists() or target.exists():
                continue
            if top.endswith(".dist-info") and dist.metadata["Name"].lower() == "torch":
                shutil.copytree(source, target)
                meta = target / "METADATA"
                meta.write_text(meta.read_text().replace("Requires-Dist:", f"Requires-Dist: {UNSATISFIED_PIN}\n"
                                                         "Requires-Dist:", 1))
            else:
                target.symlink_to(source)
    probe = subprocess.run([str(python), "-c", "import torch, torchvision\n"
                            "for name in ('pytest', 'pydantic', 'click'):\n"
                            "    try:\n        __import__(name)\n        print(name)\n"
                            "    except ImportError:\n        pass"],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    assert probe.returncode == 0 and probe.stdout.split() == [], probe.stdout + probe.stderr[-2000:]
    return python


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("wheels")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    made = subprocess.run([sys.executable, str(ROOT / "tools" / "wheels.py"), "--dest", str(dest), "--python",
                           version], capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stderr[-2000:]
    return dest


def check(host_python, wheels, out, *options, timeout=1800):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{host_python.parent}:{env['PATH']}"  # the host's python3, as on the server
    return subprocess.run(["bash", str(CHECK), "--dry-run", "--python", str(host_python), "--wheels", str(wheels),
                           "--cifar", str(CIFAR), "--out", str(out), *options],
                          capture_output=True, text=True, timeout=timeout, env=env)


def leftovers(out: Path) -> list[str]:
    """Processes still running that the check started (their command line names a scratch folder or ``out``)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "dksgraph-gpu-check." in text or str(out) in text:
            found.append(text)
    return found


def test_gpu_check_dry_run_installs_offline_into_a_bare_host_and_runs_every_step(host_python, wheels, tmp_path):
    out = tmp_path / "check"
    # budgets for a CPU shared with the rest of the suite (the GPU defaults are 180 s and 150 s)
    done = check(host_python, wheels, out, "--budget-tests", "240", "--budget-throughput", "300")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"results in {out} (summary.md)" in done.stdout
    summary = (out / "summary.md").read_text()
    assert "failed steps: none" in summary and "cut at their time budget: none" in summary
    assert "7 skipped" in summary  # the cuda tests ran under the venv's own pytest, and skip on the CPU
    assert UNSATISFIED_PIN in summary  # pip check's finding, reported and not fatal
    table = [line for line in summary.splitlines() if line.startswith(("zoo:resnet32", "torchvision:resnet50"))]
    assert len(table) == 9 and {line.split()[4] for line in table} == {"loader", "device", "synthetic"}
    for run in ("resnet32-baseline-s0", "resnet32-ds-s0", "resnet32-dks-s0"):
        assert f"| {run} | 1 |" in summary and "10000 test images" in summary
    files = sorted(p.name for p in out.iterdir())
    assert "summary.md" in files and "report.md" in files and len(files) <= 8, files
    assert all(p.is_file() and p.stat().st_size < 200_000 for p in out.iterdir())
    assert not leftovers(out)


def test_gpu_check_ends_within_its_budget_reports_cut_steps_and_leaves_nothing_running(host_python, wheels,
                                                                                      tmp_path):
    out = tmp_path / "check"
    start = time.monotonic()
    done = check(host_python, wheels, out, "--minutes", "2", "--budget-tests", "3", "--budget-throughput", "3",
                 timeout=600)
    took = time.monotonic() - start
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert took < 2 * 60 + 20, took  # its own limit, plus the kill grace
    summary = (out / "summary.md").read_text()
    cut = next(line for line in summary.splitlines() if line.startswith("- cut at their time budget:"))
    assert "cuda-tests" in cut and "throughput" in cut, cut
    assert "cut by gpu_check.sh after its budget of 3 s" in (out / "cuda_tests.log").read_text()
    assert len(list(out.iterdir())) <= 8
    assert not leftovers(out)
