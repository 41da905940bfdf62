import torch
import torchvision

from conftest import ROOT, write


def test_inspect_lists_taps_and_auto_choice(run):
    result = run("inspect", "torchvision:resnet50", "--input-size", 3, 224, 224)
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.output.splitlines() if line.startswith("layer")}
    assert rows["layer2"].rstrip().endswith("c3") and "512x28x28" in rows["layer2"]
    assert rows["layer3"].rstrip().endswith("c2") and " 4 " in rows["layer3"]
    assert "layer4" not in rows  # the final feature map is not a tap
    assert "layer1.0.add" not in rows and "layer1.0.add" in run("inspect", "torchvision:resnet50", "--all").output
    assert "final feature map: layer4 (2048x7x7, d=5)" in result.output


def test_inspect_accepts_a_spec(run):
    result = run("inspect", ROOT / "specs" / "densenet40.yaml")
    assert result.exit_code == 0
    assert "features.denseblock2" in result.output


def test_augment_summary_and_save_then_strip(run, tmp_path):
    result = run("augment", ROOT / "specs" / "resnet18.yaml", "--save", "init.pt")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "c2 (C2)" in out and "BasicBlock x2 @1024" in out and "training overhead vs backbone" in out
    assert "main->c2" in out
    result = run("strip", "init.pt", "-o", "resnet18.pt")
    assert result.exit_code == 0, result.output
    assert "verified" in result.output
    stock = torchvision.models.resnet18()
    stock.load_state_dict(torch.load(tmp_path / "resnet18.pt", weights_only=True))


def test_strip_default_output_name(run, tmp_path):
    write(tmp_path / "s.yaml", "backbone: {model: 'zoo:resnet32', input_size: [3, 32, 32]}\n")
    assert run("augment", "s.yaml", "--save", "runs/init.pt").exit_code == 0
    result = run("strip", "runs/init.pt")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / "init.stripped.pt").exists()


def test_bad_tap_exits_2_without_traceback(run, tmp_path):
    write(tmp_path / "s.yaml", "backbone: {model: 'zoo:resnet32', input_size: [3, 32, 32]}\ntaps:\n  - at: layer2.0.conv1\n")
    result = run("augment", "s.yaml", "--save", "x.pt")
    assert result.exit_code == 2
    assert "not a cut point" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x.pt").exists()


def test_input_too_small_via_cli(run, tmp_path):
    write(tmp_path / "s.yaml", "backbone: {model: 'torchvision:resnet18', input_size: [3, 8, 8]}\n")
    result = run("augment", "s.yaml")
    assert result.exit_code == 2 and "input_size" in result.output


def test_help_lists_commands(run):
    out = run("--help").output
    for command in ("inspect", "augment", "strip", "schema"):
        assert command in out
