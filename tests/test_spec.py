import json

import pytest

from conftest import SPECS, write
from dksgraph.errors import SpecError
from dksgraph.spec import load_spec, parse_spec


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_shipped_specs_validate(path):
    spec = load_spec(path)
    assert spec.name == path.stem
    # the paper's two auxiliary classifiers; resnet18_taps adds a third for Table 4 / Fig. 2; BYOT's three and
    # SDN's six internal classifiers
    taps = {"resnet18_taps": 3, "byot_resnet18_cifar100": 3, "sdn_resnet56": 6}.get(path.stem, 2)
    assert spec.taps != "auto" and len(spec.taps) == taps


def test_name_defaults_to_file_stem(tmp_path):
    spec = load_spec(write(tmp_path / "mine.yaml", "backbone: {model: 'zoo:resnet32'}\n"))
    assert spec.name == "mine" and spec.taps == "auto" and spec.synergy.pairs is None  # the method's pairs


def test_schema_command_prints_json_schema(run):
    result = run("schema")
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert schema["title"] == "dksgraph spec"
    assert {"backbone", "taps", "synergy", "train"} <= set(schema["properties"])
    assert schema["additionalProperties"] is False


def _augment_error(run, tmp_path, text: str) -> str:
    spec = write(tmp_path / "bad.yaml", text)
    result = run("augment", spec, "--save", "out.pt")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out.pt").exists()
    return " ".join(result.output.split())


def test_missing_spec_file(run, tmp_path):
    result = run("augment", "nope.yaml")
    assert result.exit_code == 2
    assert "nope.yaml` does not exist" in result.output


def test_yaml_syntax_error_names_line(run, tmp_path):
    out = _augment_error(run, tmp_path, "backbone:\n  model: zoo:resnet32\n  kwargs: {num_classes: 10\n")
    assert "not valid YAML at line 4" in out


def test_misspelt_key_lists_allowed_keys(run, tmp_path):
    out = _augment_error(run, tmp_path, "backbone: {model: 'zoo:resnet32'}\ntaps:\n  - at: layer1\n    dpeth: [5, 3]\n")
    assert "unknown key `taps.0.dpeth`" in out
    assert "did you mean `depth`" in out
    assert "allowed keys here: at, name, depth, width, alpha" in out


def test_unknown_model_suggests_close_names(run, tmp_path):
    out = _augment_error(run, tmp_path, "backbone: {model: 'zoo:resnet23'}\n")
    assert "unknown model `zoo:resnet23`" in out and "`resnet32`" in out
    out = _augment_error(run, tmp_path, "backbone: {model: 'torchvision:resnt18'}\n")
    assert "`resnet18`" in out


def test_duplicate_tap_names(run, tmp_path):
    out = _augment_error(run, tmp_path, "backbone: {model: 'zoo:resnet32'}\ntaps:\n  - {at: layer1}\n  - {at: layer1}\n")
    assert "duplicate tap name(s) layer1" in out


def test_pair_naming_unknown_classifier(run, tmp_path):
    out = _augment_error(
        run, tmp_path,
        "backbone: {model: 'zoo:resnet32'}\ntaps:\n  - {at: layer2, name: c2}\nsynergy:\n  pairs: [[main, c3]]\n")
    assert "unknown classifier `c3`" in out and "main, c2" in out


def test_pair_with_auto_taps_checked_after_resolution(run, tmp_path):
    out = _augment_error(run, tmp_path,
                         "backbone: {model: 'zoo:resnet32', input_size: [3, 32, 32]}\nsynergy: {pairs: [[main, c9]]}\n")
    assert "unknown classifier `c9`" in out


def test_depth_width_lengths_must_agree():
    with pytest.raises(SpecError, match="depth has 2 entries but width has 1"):
        parse_spec({"backbone": {"model": "zoo:resnet32"}, "taps": [{"at": "layer1", "depth": [1, 2], "width": [1.0]}]})


def test_spec_that_is_not_a_mapping(tmp_path):
    with pytest.raises(SpecError, match="must hold a mapping"):
        load_spec(write(tmp_path / "list.yaml", "- 1\n- 2\n"))
