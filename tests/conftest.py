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


def image_folder(root: Path, per_class: int = 3, suffix: str = ".png", corrupt: Path | None = None) -> Path:
    """A tiny ImageFolder dataset (train/ and test/, classes a and b, random 32x32 images); ``corrupt``
    (relative to ``root``) is then overwritten with bytes that are no image."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=gen).numpy()
                Image.fromarray(pixels).save(root / split / c / f"{i}{suffix}")
    if corrupt is not None:
        (root / corrupt).write_bytes(b"\xff\xd8\xff not really an image")
    return root
