import shutil
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # for `toynets:...` model names

from dksgraph.cli import cli  # noqa: E402

SPECS = sorted((ROOT / "specs").glob("*.yaml"))
HAS_DOT = shutil.which("dot") is not None


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _cpu_unless_marked_cuda(request, monkeypatch):
    """The suite means the same on every machine: only tests marked `cuda` see a GPU (their processes too)."""
    if request.node.get_closest_marker("cuda") is None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture
def run(tmp_path, monkeypatch):
    """Run the CLI in a temporary working directory; returns click's Result."""
    monkeypatch.chdir(tmp_path)

    def invoke(*args: str):
        return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)

    return invoke


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
