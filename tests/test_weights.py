"""Pretrained backbones (`backbone.weights`): load first, then a classifier of the spec's size."""

import urllib.error

import torch
import torchvision

from conftest import ROOT, write
from dksgraph.augmented import augment
from dksgraph.spec import parse_spec

TEST_DATA = ROOT / "tests" / "data"


def spec(weights, num_classes=10, model="torchvision:resnet18", size=64):
    return parse_spec({"backbone": {"model": model, "kwargs": {"num_classes": num_classes},
                                    "input_size": [3, size, size], "weights": str(weights)}})


def marked_resnet18(num_classes=1000):
    torch.manual_seed(3)
    net = torchvision.models.resnet18(num_classes=num_classes)
    with torch.no_grad():
        net.conv1.weight.fill_(0.25)
    return net


def test_a_local_state_dict_with_another_number_of_classes(tmp_path):
    source = marked_resnet18()
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    model = augment(spec(tmp_path / "r18.pth"))
    backbone = model.backbone
    for key, value in source.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(backbone.state_dict()[key], value), key
    assert backbone.fc.out_features == 10 and model(torch.randn(2, 3, 64, 64))["main"].shape == (2, 10)


def test_a_dksgraph_checkpoint_as_weights(tmp_path):
    model = augment(parse_spec({"backbone": {"model": "toynets:odd_net", "kwargs": {"num_classes": 4},
                                             "input_size": [3, 32, 32],
                                             "weights": str(TEST_DATA / "odd_net-dbeb482.pt")}}))
    saved = torch.load(TEST_DATA / "odd_net-dbeb482.pt", weights_only=True)["model"]
    assert torch.equal(model.backbone.stage2[0].conv.weight, saved["backbone.stage2.0.conv.weight"])
    assert model.backbone.fc.out_features == 4


def test_a_torchvision_weights_name_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(marked_resnet18().state_dict(), tmp_path / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[1])
    model = augment(spec("IMAGENET1K_V1"))
    assert bool((model.backbone.conv1.weight == 0.25).all()) and model.backbone.fc.out_features == 10


def test_offline_the_missing_weights_file_is_named(run, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    write(tmp_path / "s.yaml", "backbone: {model: 'torchvision:resnet18', kwargs: {num_classes: 10}, "
                               "input_size: [3, 64, 64], weights: IMAGENET1K_V1}\n")
    result = run("augment", "s.yaml", "--save", "init.pt")
    assert result.exit_code == 2 and "Traceback" not in result.output
    flat = " ".join(result.output.split())
    assert "could not fetch the IMAGENET1K_V1 weights" in flat
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in flat
    assert not (tmp_path / "init.pt").exists()


def test_weights_in_kwargs_and_unknown_names_are_explained(run, tmp_path):
    write(tmp_path / "k.yaml", "backbone: {model: 'torchvision:resnet18', kwargs: {weights: IMAGENET1K_V1, "
                               "num_classes: 10}}\n")
    result = run("augment", "k.yaml")
    assert result.exit_code == 2 and "`backbone.weights`" in result.output and "Traceback" not in result.output
    write(tmp_path / "u.yaml", "backbone: {model: 'torchvision:resnet18', weights: IMAGENET9K}\n")
    result = run("augment", "u.yaml")
    assert result.exit_code == 2 and "IMAGENET1K_V1" in result.output


def test_a_file_of_another_model_is_refused(run, tmp_path):
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    write(tmp_path / "s.yaml", f"backbone: {{model: 'torchvision:resnet18', weights: '{tmp_path / 'r34.pth'}'}}\n")
    result = run("augment", "s.yaml")
    assert result.exit_code == 2 and "does not fit `torchvision:resnet18`" in " ".join(result.output.split())


def test_resume_eval_and_strip_do_not_read_the_weights_again(run, tmp_path):
    torch.save(marked_resnet18(10).state_dict(), tmp_path / "r18.pth")
    write(tmp_path / "s.yaml", f"backbone: {{model: 'torchvision:resnet18', kwargs: {{num_classes: 10}}, "
                               f"input_size: [3, 32, 32], weights: '{tmp_path / 'r18.pth'}'}}\n"
                               "taps: [{at: layer3, name: c2}]\n")
    assert run("augment", "s.yaml", "--save", "init.pt").exit_code == 0
    (tmp_path / "r18.pth").unlink()  # a machine without the weights file
    assert run("strip", "init.pt", "-o", "plain.pt").exit_code == 0
    evaluated = run("eval", "init.pt", "--dataset", "synthetic", "--limit-eval-batches", 1, "--batch-size", 8)
    assert evaluated.exit_code == 0, evaluated.output
    stock = torchvision.models.resnet18(num_classes=10)
    stock.load_state_dict(torch.load(tmp_path / "plain.pt", weights_only=True))
    assert bool((stock.conv1.weight == 0.25).all())
