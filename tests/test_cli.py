import pytest
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
    assert "1 x H(softmax(main / 1).detach(), softmax(c2 / 1))" in out and "objective: dks" in out
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


BAD_TAPS = {
    "unknown tap": ("zoo:resnet32", "  - at: layer22\n", "unknown tap `layer22`"),
    "not a cut point": ("zoo:resnet32", "  - at: layer2.0.conv1\n", "nearest valid taps are"),
    "at the final feature map": ("zoo:resnet32", "  - at: layer3\n", "at or after the final feature map `layer3`"),
    "depth length": ("zoo:resnet32", "  - {at: layer1, depth: [5]}\n", "`depth` has 1 entry but this branch has 2 stages"),
    "width length": ("zoo:resnet32", "  - {at: layer2, width: [1.0, 2.0]}\n", "`width` has 2 entries but this branch has 1 stage"),
    "width on copied blocks": ("toynets:odd_net", "  - {at: stage2, width: [2.0]}\nbranch_copy: blocks\n",
                               "no builder for that block family, and `branch_copy: blocks`"),
    "untraceable": ("toynets:gated_net", "  - at: stage1\n", "module `stage2.1.1` (Gate)"),
}


@pytest.mark.parametrize("case", sorted(BAD_TAPS))
def test_bad_taps_exit_2_with_their_message(run, tmp_path, case):
    model, taps, message = BAD_TAPS[case]
    write(tmp_path / "s.yaml", f"backbone: {{model: '{model}', input_size: [3, 32, 32]}}\ntaps:\n{taps}")
    result = run("augment", "s.yaml", "--save", "x.pt", "--render")
    text = " ".join(result.output.split())
    assert result.exit_code == 2, text
    assert message in text and "Traceback" not in text
    assert list(tmp_path.iterdir()) == [tmp_path / "s.yaml"]  # nothing written


def test_augment_with_model_instead_of_spec(run):
    result = run("augment", "--model", "zoo:resnet32", "--taps", "auto")
    assert result.exit_code == 0, result.output
    assert "auto c2: layer2" in result.output and "auto c3: layer1" in result.output
    result = run("augment", "--model", "torchvision:resnet18", "--taps", "layer2,layer3", "--input-size", 3, 64, 64,
                 "--num-classes", 7)
    assert result.exit_code == 0, result.output
    assert "layer3 (C2)" in result.output and "layer2 (C3)" in result.output
    neither = run("augment")
    assert neither.exit_code == 2 and "give a spec file or a model name, once" in " ".join(neither.output.split())


def test_inspect_and_augment_take_a_model_the_same_two_ways(run):
    for command in ("inspect", "augment"):
        positional = run(command, "zoo:resnet32")
        option = run(command, "--model", "zoo:resnet32")
        assert positional.exit_code == option.exit_code == 0, positional.output + option.output
        assert positional.output == option.output
        both = run(command, "zoo:resnet32", "--model", "zoo:resnet32")
        neither = run(command)
        for result in (both, neither):
            assert result.exit_code == 2 and "give a spec file or a model name, once" in " ".join(result.output.split())


def test_load_gives_back_the_trained_augmented_model(run, tmp_path):
    import dksgraph

    assert run("augment", "zoo:resnet32", "--save", "init.pt").exit_code == 0
    saved = torch.load(tmp_path / "init.pt", weights_only=True)["model"]
    model = dksgraph.load(tmp_path / "init.pt")
    assert isinstance(model, dksgraph.AugmentedModel) and model.classifiers == ["main", "c2", "c3"]
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    with pytest.raises(dksgraph.CheckpointError):
        dksgraph.load(tmp_path / "missing.pt")
