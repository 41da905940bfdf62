"""Every classifier leaves the project: state_dict (+ sidecar), torch.export, ONNX; verified before writing."""

import json
import os
import subprocess
import sys

import pytest
import torch

import dksgraph
from conftest import ROOT, SPECS, write
from dksgraph.augmented import augment
from dksgraph.checkpoint import save_checkpoint
from dksgraph.deploy.classifiers import classifier
from dksgraph.deploy.exports import load_exported
from dksgraph.deploy.formats import identical
from dksgraph.loss import ensemble_probabilities
from dksgraph.spec import load_spec, parse_spec

TORCHVISION = ["resnet18", "densenet121", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
               "convnext_tiny", "regnet_x_400mf"]
HEAVY_SPECS = {"resnet1202", "wrn28_10", "resnet152"}  # minutes of torch.export on 2 cores: run apart


def exports_reload_equal(model, tmp_path, formats=("state_dict", "exported"), ensemble=False, traced=None):
    """Each classifier (and the ensemble) in each format reloads to the augmented model's output;
    ``traced`` limits the torch.export round trips to those classifiers (the slow part)."""
    model.eval()
    x = torch.randn(4, *model.spec.backbone.input_size)
    with torch.no_grad():
        logits = model.logits(x)
    want = {**logits, "ensemble": ensemble_probabilities(list(logits.values()))} if ensemble else logits
    for name, expected in want.items():
        for fmt in formats:
            if fmt == "exported" and traced is not None and name not in traced:
                continue
            done = dksgraph.export(model, tmp_path / f"{name}.{fmt}{'.pt2' if fmt == 'exported' else '.pt'}", name, fmt)
            assert done.check.tolerance is None  # bit for bit
            reloaded = load_exported(done.path)
            with torch.no_grad():
                assert identical(reloaded(x), expected), (name, fmt)


# the fast tier exports the small paper specs; the larger ones (10-30 s each) run in `make test-all`
SLOW_SPECS = {"wrn28_10_dropout", "densenet100", "resnet50", "resnet110", "resnet18_taps"}
SLOW_TORCHVISION = {"densenet121", "efficientnet_b0", "convnext_tiny", "regnet_x_400mf", "mobilenet_v2"}


def _tiered(values, slow, ids=str):
    return [pytest.param(v, marks=pytest.mark.slow) if ids(v) in slow else v for v in values]


@pytest.mark.parametrize("path", _tiered([p for p in SPECS if p.stem not in HEAVY_SPECS], SLOW_SPECS,
                                         lambda p: p.stem), ids=lambda p: p.stem)
def test_every_classifier_of_every_paper_spec_exports_and_reloads_equal(path, tmp_path):
    torch.manual_seed(0)
    exports_reload_equal(augment(load_spec(path)), tmp_path, ensemble=path.stem == "resnet32")


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in SPECS if p.stem in HEAVY_SPECS], ids=lambda p: p.stem)
def test_every_classifier_of_the_largest_paper_specs_exports_and_reloads_equal(path, tmp_path):
    torch.manual_seed(0)
    # ResNet-1202's three classifiers took 171 s through torch.export on 2 cores, c3 alone 59 s; its smallest
    # stands for them (ResNet-110, the same network with fewer blocks, exports all of them above)
    exports_reload_equal(augment(load_spec(path)), tmp_path, traced={"c3"} if path.stem == "resnet1202" else None)


@pytest.mark.parametrize("name", _tiered(TORCHVISION, SLOW_TORCHVISION))
def test_torchvision_families_export_and_reload_equal(name, tmp_path):
    torch.manual_seed(0)
    spec = parse_spec({"backbone": {"model": f"torchvision:{name}", "kwargs": {"num_classes": 10},
                                    "input_size": [3, 64, 64]}})
    exports_reload_equal(augment(spec), tmp_path, ensemble=name == "resnet18")


@pytest.mark.parametrize("name", _tiered(["resnet18", "densenet121", "mobilenet_v2"], {"densenet121", "mobilenet_v2"}))
def test_onnx_within_tolerance_under_onnxruntime(name, tmp_path):
    import onnxruntime

    torch.manual_seed(0)
    model = augment(parse_spec({"backbone": {"model": f"torchvision:{name}", "kwargs": {"num_classes": 10},
                                             "input_size": [3, 64, 64]}})).eval()
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        logits = model.logits(x)
    for label in model.classifiers:
        done = dksgraph.export(model, tmp_path / f"{label}.onnx", label, "onnx")
        assert done.check.max_abs_diff <= done.check.tolerance
        session = onnxruntime.InferenceSession(str(done.path), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])  # a batch of 5: the batch is dynamic
        assert (got - logits[label]).abs().max() <= done.check.tolerance


def test_an_auxiliary_classifier_holds_no_backbone_node_after_its_tap():
    model = augment(load_spec(ROOT / "specs" / "resnet32.yaml"))
    order = model.traced.index
    for plan in model.plans:
        module = classifier(model, plan.label)
        nodes = [n.meta["qualname"] for n in module.trunk.graph.nodes if n.op not in ("placeholder", "output")]
        assert nodes and max(order[q] for q in nodes) == order[plan.node]
        assert not any(q.startswith(("layer3", "fc", "avgpool")) for q in nodes) or plan.label != "c3"
    assert sum(p.numel() for p in classifier(model, "c3").trunk.parameters()) < sum(
        p.numel() for p in model.backbone.parameters()) / 2  # c3 taps after layer1: most of the backbone is gone


def test_export_cli_writes_verified_files_and_the_one_line_loaders(run, tmp_path):
    torch.manual_seed(0)
    spec = load_spec(ROOT / "specs" / "resnet32.yaml")
    save_checkpoint(tmp_path / "r32.pt", spec, augment(spec))
    result = run("export", "r32.pt", "--classifier", "c2", "--format", "exported")
    assert result.exit_code == 0, result.output
    assert "equal bit for bit" in result.output and "wrote r32.c2.pt2" in result.output
    loaded = torch.export.load(str(tmp_path / "r32.c2.pt2")).module()  # no dksgraph needed
    assert loaded(torch.randn(3, 3, 32, 32)).shape == (3, 100)
    result = run("export", "r32.pt", "--classifier", "ensemble", "--classifiers", "main,c3", "-o", "ens.pt")
    assert result.exit_code == 0, result.output
    sidecar = json.loads((tmp_path / "ens.pt.json").read_text())
    assert sidecar["classifier"] == "ensemble" and sidecar["members"] == ["main", "c3"]
    probs = load_exported(tmp_path / "ens.pt")(torch.randn(2, 3, 32, 32))
    assert torch.allclose(probs.sum(-1), torch.ones(2))
    assert run("strip", "r32.pt").exit_code == 0
    main = load_exported(tmp_path / "r32.stripped.pt")
    assert type(main).__name__ == "CifarResNet"


def test_bad_export_requests_exit_2_and_write_nothing(run, tmp_path, monkeypatch):
    spec = load_spec(ROOT / "specs" / "resnet32.yaml")
    save_checkpoint(tmp_path / "r32.pt", spec, augment(spec))
    base = spec.model_copy(update={"taps": []})
    save_checkpoint(tmp_path / "base.pt", base, augment(base))
    before = set(os.listdir(tmp_path))
    cases = [
        (["r32.pt", "--classifier", "c9"], "no classifier `c9` in this checkpoint; its classifiers are main, c2, c3"),
        (["base.pt", "--classifier", "c2"], "a baseline run has only `main`"),
        (["r32.pt", "--format", "safetensors"], "Invalid value for '--format'"),
        (["r32.pt", "--classifier", "ensemble", "--classifiers", "main"], "an ensemble needs two or more"),
        (["r32.pt", "--classifiers", "main,c2"], "use it with `--classifier ensemble`"),
    ]
    for args, message in cases:
        result = run("export", *args)
        assert result.exit_code == 2 and message in " ".join(result.output.split()), (args, result.output)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the `export` extra were not installed
    result = run("export", "r32.pt", "--format", "onnx")
    assert result.exit_code == 2 and "pip install 'dksgraph[export]'" in result.output
    assert set(os.listdir(tmp_path)) == before and "Traceback" not in result.output


def test_eval_costs_table_plot_and_json(run, tmp_path):
    torch.manual_seed(0)
    write(tmp_path / "s.yaml", "backbone: {model: 'zoo:resnet32', kwargs: {num_classes: 10}, input_size: [3, 32, 32]}\n"
                               "train: {dataset: synthetic}\n")
    spec = load_spec(tmp_path / "s.yaml")
    save_checkpoint(tmp_path / "r.pt", spec, augment(spec))
    result = run("eval", "r.pt", "--costs", "--plot", "costs.svg", "--json", "e.json", "--limit-eval-batches", 1)
    assert result.exit_code == 0, result.output
    assert "MFLOPs / image" in result.output and "CPU ms, batch 32" in result.output
    costs = json.loads((tmp_path / "e.json").read_text())["costs"]
    assert [c["classifier"] for c in costs] == ["main", "c2", "c3", "ensemble"]
    assert costs[0]["flops"] < costs[-1]["flops"] and all(c["ms_1"] > 0 for c in costs)
    assert (tmp_path / "costs.svg").read_text().startswith("<?xml")


def test_eval_output_main_lets_plain_evaluation_loops_take_the_model():
    model = augment(load_spec(ROOT / "specs" / "resnet32.yaml"), eval_output="main")
    x = torch.randn(2, 3, 32, 32)
    assert isinstance(model.train()(x), dict)
    logits = model.eval()(x)
    assert isinstance(logits, torch.Tensor) and torch.equal(logits, model.logits(x)["main"])


@pytest.mark.parametrize("example, args", [("plain_loop.py", ["--steps", "3", "--out", "out"]),
                                           ("timm_model.py", ["--steps", "2"])])
def test_examples_run_on_synthetic_data(example, args, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "examples" / example), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step" in done.stdout and "Traceback" not in done.stderr
