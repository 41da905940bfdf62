import torch

from dksgraph.augmented import augment
from dksgraph.spec import parse_spec
from dksgraph.checkpoint import FORMAT, atomic_save, load_checkpoint, save_checkpoint

SPEC = {"name": "r32", "backbone": {"model": "zoo:resnet32", "kwargs": {"num_classes": 10}, "input_size": [3, 32, 32]}}


def saved(tmp_path, spec=SPEC):
    s = parse_spec(spec)
    path = save_checkpoint(tmp_path / "ckpt.pt", s, augment(s), epoch=0, metrics={})
    return path


def test_checkpoint_is_plain_data(tmp_path):
    path = saved(tmp_path)
    data = torch.load(path, weights_only=True)
    assert data["format"] == FORMAT and data["spec"]["backbone"]["model"] == "zoo:resnet32"
    assert load_checkpoint(path)["epoch"] == 0
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp files left


def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "x.pt"
    atomic_save({"a": 1}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk on fire")

    try:
        atomic_save({"a": Boom()}, path)
    except RuntimeError:
        pass
    assert torch.load(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def _strip_error(run, tmp_path, path) -> str:
    result = run("strip", path, "-o", tmp_path / "out.pt")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out.pt").exists()
    return " ".join(result.output.split())


def test_missing_checkpoint(run, tmp_path):
    assert "does not exist" in _strip_error(run, tmp_path, tmp_path / "none.pt")


def test_plain_state_dict_is_not_a_dksgraph_checkpoint(run, tmp_path):
    torch.save({"w": torch.zeros(1)}, tmp_path / "sd.pt")
    assert "is not a dksgraph/1 checkpoint" in _strip_error(run, tmp_path, tmp_path / "sd.pt")


class Payload:
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_pickled_objects_are_refused(run, tmp_path):
    torch.save({"format": FORMAT, "spec": SPEC, "model": {}, "evil": Payload()}, tmp_path / "evil.pt")
    out = _strip_error(run, tmp_path, tmp_path / "evil.pt")
    assert "holds pickled Python objects" in out


def test_corrupt_file(run, tmp_path):
    path = saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "is damaged at its end: the zip end record is missing" in _strip_error(run, tmp_path, path)
    path.write_bytes(b"\0" * 4096)  # no zip at all
    out = _strip_error(run, tmp_path, path)
    assert "not a readable PyTorch file" in out and str(path) in out and "Notice" not in out


def test_weights_that_do_not_fit_the_spec(run, tmp_path):
    path = saved(tmp_path)
    data = torch.load(path, weights_only=True)
    data["spec"]["backbone"]["kwargs"]["num_classes"] = 100
    torch.save(data, path)
    out = _strip_error(run, tmp_path, path)
    assert "do not fit the network the spec describes" in out and "wrong shape" in out


def test_strip_refuses_to_overwrite_its_input(run, tmp_path):
    path = saved(tmp_path)
    result = run("strip", path, "-o", path)
    assert result.exit_code == 2 and "is the checkpoint itself" in " ".join(result.output.split())
    assert load_checkpoint(path)["format"] == FORMAT
