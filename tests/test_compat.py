"""Checkpoints written by earlier releases keep working: `dksgraph/1` is a promise (README, Checkpoints)."""

import shutil

import torch

from conftest import ROOT
from dksgraph.checkpoint import load_checkpoint
from toynets import odd_net

FIRST_RELEASE = ROOT / "tests" / "data" / "odd_net-dbeb482.pt"


def test_a_first_release_checkpoint_strips_evaluates_and_resumes(run, tmp_path):
    (tmp_path / "r").mkdir()
    shutil.copy(FIRST_RELEASE, tmp_path / "r" / "last.pt")
    stripped = run("strip", "r/last.pt", "-o", "odd.pt")
    assert stripped.exit_code == 0, stripped.output
    assert "bit for bit" in stripped.output and "dropped 2 branches" in stripped.output
    plain = odd_net(num_classes=10)
    plain.load_state_dict(torch.load(tmp_path / "odd.pt", weights_only=True))
    saved = torch.load(FIRST_RELEASE, weights_only=True)["model"]
    assert all(torch.equal(v, saved[f"backbone.{k}"]) for k, v in plain.state_dict().items())
    evaluated = run("eval", "r/last.pt", "--json", "e.json")
    assert evaluated.exit_code == 0, evaluated.output
    assert "odd (dks)" in evaluated.output and "synthetic test set (256 images)" in evaluated.output
    resumed = run("train", "--resume", "r/last.pt")  # its recipe lived in `config` then; it is read from there
    assert resumed.exit_code == 0, resumed.output
    assert "from epoch 2 to epoch 2" in resumed.output
    ckpt = load_checkpoint(tmp_path / "r" / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["spec"]["train"]["epochs"] == 2 and ckpt["spec"]["train"]["method"] == "dks"


def test_stripping_a_checkpoint_builds_no_branch(monkeypatch):
    import pytest

    from dksgraph import augmented
    from dksgraph.branches import build, plan
    from dksgraph.deploy import strip

    for module, name in ((augmented, "build_branch"), (augmented, "plan_branch"), (build, "build_branch"),
                         (plan, "plan_branch")):
        monkeypatch.setattr(module, name, lambda *a, _name=name, **k: pytest.fail(f"strip called {_name}"))
    strip(FIRST_RELEASE)


def test_a_checkpoint_with_foreign_or_missing_branch_weights_is_refused(run, tmp_path):
    ckpt = torch.load(FIRST_RELEASE, weights_only=True)
    ckpt["spec"]["taps"] = [{"at": "stage2", "name": "c2"}, {"at": "stage1", "name": "c9"}]
    torch.save(ckpt, tmp_path / "missing.pt")
    ckpt = torch.load(FIRST_RELEASE, weights_only=True)
    ckpt["model"]["extra.weight"] = torch.zeros(1)
    torch.save(ckpt, tmp_path / "stray.pt")
    for name, message in (("missing", "branch(es) c9 that its spec lists are missing"),
                          ("stray", "neither the backbone nor a branch (e.g. extra.weight)")):
        result = run("strip", f"{name}.pt", "-o", "out.pt")
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
        assert not (tmp_path / "out.pt").exists()
