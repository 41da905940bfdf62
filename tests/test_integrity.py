"""Every file dksgraph writes is sealed and verified on read: a flipped bit is caught, never trained on or deployed."""

import random
import struct
import zipfile

import pytest
import torch

import dksgraph
from dksgraph.augmented import augment
from dksgraph.checkpoint import load_checkpoint, save_checkpoint
from dksgraph.deploy.exports import export, load_exported
from dksgraph.errors import CheckpointError
from dksgraph.integrity import DamagedFile, verify
from dksgraph.spec import parse_spec

SPEC = {"name": "odd", "backbone": {"model": "toynets:odd_net", "kwargs": {"num_classes": 10},
                                    "input_size": [3, 32, 32]}, "taps": "auto"}


def trained_checkpoint(path):
    """A checkpoint as training writes it: weights, momentum buffers, scheduler, RNG and metrics."""
    torch.manual_seed(0)
    spec = parse_spec(SPEC)
    model = augment(spec)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    out = model(torch.randn(4, 3, 32, 32))
    sum(v.sum() for v in out.values()).backward()
    opt.step()
    return save_checkpoint(path, spec, model, optimizer=opt.state_dict(), epoch=1, rng={"torch": torch.get_rng_state()},
                           metrics={"test/acc1/main": 10.0})


def data_spans(path):
    """(start, end, name) of every record's bytes in a zip file."""
    data = path.read_bytes()
    spans = []
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
            start = info.header_offset + 30 + name_len + extra_len
            spans.append((start, start + info.compress_size, info.filename))
    return spans


def flip_positions(path, count, seed=0):
    """``count`` positions spread over a zip file: the first bytes, one inside every record (when there are
    fewer records than ``count``), every end record, the seal, and the rest evenly."""
    size = path.stat().st_size
    rng = random.Random(seed)
    spans = [s for s in data_spans(path) if s[1] > s[0]]
    chosen = {0, 1, 2, 3, 4, 10, 20, size - 1, size - 20, size - 60, size - 88, size - 89, size - 100, size - 110}
    if len(spans) + len(chosen) < count:
        chosen |= {rng.randrange(start, end) for start, end, _ in spans}
    step = size / (count - len(chosen) + 1)
    k = 1
    while len(chosen) < count:
        chosen.add(min(size - 1, int(k * step)))
        k += 1
    return sorted(chosen)[:count]


def flipped(source, target, position):
    data = bytearray(source.read_bytes())
    data[position] ^= 1 << (position % 8)
    target.write_bytes(bytes(data))
    return target


def test_a_bit_flipped_anywhere_in_a_checkpoint_is_caught_and_named(tmp_path):
    good = trained_checkpoint(tmp_path / "good.pt")
    spans = data_spans(good)
    records = [s for s in spans if "/data/" in s[2] and s[1] > s[0]]
    positions = flip_positions(good, 200)
    assert len(positions) == 200
    assert all(any(start <= p < end for p in positions) for start, end, _ in records)  # every tensor's bytes
    # what the seal is for: plain torch.load reads a file with a flipped tensor bit without a word
    start, end, _ = records[len(records) // 2]
    assert torch.load(flipped(good, tmp_path / "plain.pt", (start + end) // 2), weights_only=True)["epoch"] == 1
    detected, named = 0, 0
    bad = tmp_path / "last.pt"
    for position in positions:
        flipped(good, bad, position)
        with pytest.raises(CheckpointError) as caught:
            load_checkpoint(bad)
        assert f"`{bad}`" in str(caught.value), (position, str(caught.value))
        detected += 1
        record = next((name for start, end, name in records if start <= position < end), None)
        if record is not None:
            assert f"(record `{record}`)" in str(caught.value) and "the tensor `" in str(caught.value)
            named += 1
    assert detected == 200 and named >= len(records)


def test_the_damaged_tensor_is_named_by_where_it_sits_in_the_checkpoint(tmp_path):
    good = trained_checkpoint(tmp_path / "good.pt")
    ckpt = torch.load(good, weights_only=True)
    key = "branches.c3.head.fc.weight" if "branches.c3.head.fc.weight" in ckpt["model"] else sorted(ckpt["model"])[-2]
    wanted = ckpt["model"][key]
    for start, end, _ in data_spans(good):
        if end - start == wanted.numel() * wanted.element_size():
            data = good.read_bytes()
            if torch.equal(torch.frombuffer(bytearray(data[start:end]), dtype=wanted.dtype).view_as(wanted), wanted):
                break
    with pytest.raises(DamagedFile) as caught:
        load_checkpoint(flipped(good, tmp_path / "bad.pt", start + 5))
    assert f"the tensor `model['{key}']`" in str(caught.value)


def test_truncation_anywhere_is_refused_with_the_file_named(tmp_path):
    good = trained_checkpoint(tmp_path / "good.pt")
    data = good.read_bytes()
    bad = tmp_path / "cut.pt"
    offsets = sorted({1, len(data) - 1, *(len(data) * k // 19 for k in range(1, 19))})
    assert len(offsets) == 20
    for offset in offsets:
        bad.write_bytes(data[:offset])
        with pytest.raises(CheckpointError) as caught:
            load_checkpoint(bad)
        assert f"`{bad}`" in str(caught.value)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A trained checkpoint and its main classifier as a stripped state_dict and a .pt2."""
    folder = tmp_path_factory.mktemp("exports")
    ckpt = trained_checkpoint(folder / "last.pt")
    return {"checkpoint": ckpt, "state_dict": export(ckpt, folder / "odd.pt", "main", "state_dict").path,
            "exported": export(ckpt, folder / "odd.pt2", "c2", "exported").path}


@pytest.mark.parametrize("fmt", ["state_dict", "exported"])
def test_a_bit_flipped_in_an_export_is_caught(exports, fmt, tmp_path):
    good = exports[fmt]
    bad = tmp_path / good.name
    if fmt == "state_dict":
        bad.with_name(bad.name + ".json").write_bytes(good.with_name(good.name + ".json").read_bytes())
    positions = flip_positions(good, 50)
    for position in positions:
        flipped(good, bad, position)
        with pytest.raises(CheckpointError) as caught:
            load_exported(bad)
        assert f"`{bad}`" in str(caught.value) and "Export it again" in str(caught.value), position
    assert len(positions) == 50


def test_a_damaged_sidecar_is_caught(exports, tmp_path):
    good = exports["state_dict"]
    sidecar = good.with_name(good.name + ".json")
    (tmp_path / good.name).write_bytes(good.read_bytes())
    bad = tmp_path / sidecar.name
    size = sidecar.stat().st_size
    for position in sorted({size * k // 20 for k in range(20)}):
        flipped(sidecar, bad, position)
        with pytest.raises(CheckpointError) as caught:
            load_exported(tmp_path / good.name)
        assert f"`{bad}`" in str(caught.value), position


def test_sealed_files_still_read_with_plain_pytorch(exports):
    state = torch.load(exports["state_dict"], weights_only=True)
    net = dksgraph.load(exports["checkpoint"]).eval()
    assert all(torch.equal(v, net.state_dict()[f"backbone.{k}"]) for k, v in state.items())
    program = torch.export.load(str(exports["exported"])).module()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(program(x), net(x)["c2"])
    assert verify(exports["checkpoint"]).sealed and verify(exports["exported"]).sealed


def test_a_bit_flipped_in_an_onnx_export_is_caught(exports, tmp_path, run):
    pytest.importorskip("onnxscript")
    import onnx

    good = export(exports["checkpoint"], tmp_path / "odd.onnx", "main", "onnx").path
    model = onnx.load(str(good))  # the seal is one more metadata entry; onnx reads the file as before
    assert [p.key for p in model.metadata_props][-1] == "dksgraph-seal/1"
    bad = tmp_path / "bad.onnx"
    size = good.stat().st_size
    positions = sorted({0, 1, size - 1, size - 30, size - 70, *(size * k // 46 for k in range(1, 46))})
    assert len(positions) == 50
    for position in positions:
        flipped(good, bad, position)
        with pytest.raises(DamagedFile) as caught:
            verify(bad)
        assert f"`{bad}`" in str(caught.value), position
    result = run("verify", good, bad)
    assert result.exit_code == 1
    assert result.output.splitlines()[0].startswith("ok") and result.output.splitlines()[1].startswith("damaged")


def test_verify_prints_one_line_per_file_and_exits_0_only_when_all_are_ok(exports, tmp_path, run):
    from conftest import ROOT

    ok = run("verify", exports["checkpoint"], exports["state_dict"], exports["exported"])
    assert ok.exit_code == 0, ok.output
    lines = ok.output.splitlines()
    assert len(lines) == 3 and all(line.startswith("ok") for line in lines)
    assert "sha256" in lines[0] and "records CRC-32 checked" in lines[0] and "odd.pt.json: sha256" in lines[1]
    old = ROOT / "tests" / "data" / "odd_net-dbeb482.pt"
    mixed = run("verify", exports["checkpoint"], old)
    assert mixed.exit_code == 1 and mixed.output.splitlines()[1].startswith("no checksum")
    spans = [s for s in data_spans(exports["checkpoint"]) if "/data/" in s[2]]
    bad = flipped(exports["checkpoint"], tmp_path / "bad.pt", spans[3][0])
    damaged = run("verify", bad, exports["checkpoint"])
    assert damaged.exit_code == 1
    assert damaged.output.startswith("damaged") and f"(record `{spans[3][2]}`)" in damaged.output
    missing = run("verify", exports["checkpoint"], tmp_path / "none.pt", bad)
    assert missing.exit_code == 2 and missing.output.splitlines()[1].startswith("missing")


@pytest.mark.parametrize("command", ["strip", "eval", "export", "load"])
def test_every_reader_refuses_a_damaged_checkpoint_and_writes_nothing(exports, command, tmp_path, run):
    spans = [s for s in data_spans(exports["checkpoint"]) if "/data/" in s[2]]
    bad = flipped(exports["checkpoint"], tmp_path / "last.pt", (spans[0][0] + spans[0][1]) // 2)
    before = sorted(p.name for p in tmp_path.iterdir())
    if command == "load":
        with pytest.raises(CheckpointError) as caught:
            dksgraph.load(bad)
        out = str(caught.value)
    else:
        args = {"strip": ["-o", "out.pt"], "eval": ["--json", "e.json"], "export": ["--classifier", "c2"]}[command]
        result = run(command, bad, *args)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        out = " ".join(result.output.split())
    assert f"`{bad}` is damaged at the tensor `model['backbone." in out
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_strip_says_it_compared_with_a_verified_file(exports, tmp_path, run):
    result = run("strip", exports["checkpoint"], "-o", tmp_path / "s.pt")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "equal bit for bit" in text and "read after its checksum was verified: sha256" in text
    assert verify(tmp_path / "s.pt").sealed


def test_a_resume_from_a_damaged_checkpoint_offers_the_other_one(tmp_path, run):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    trained_checkpoint(run_dir / "best.pt")
    trained_checkpoint(run_dir / "last.pt")
    good = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    spans = [s for s in data_spans(run_dir / "last.pt") if "/data/" in s[2]]
    for damaged, other in (("last.pt", "best.pt"), ("best.pt", "last.pt")):
        flipped(run_dir / damaged, run_dir / damaged, spans[1][0])
        before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
        result = run("train", "--resume", run_dir / damaged)
        text = " ".join(result.output.split())
        assert result.exit_code == 2 and f"`{run_dir / damaged}` is damaged" in text, result.output
        assert f"`dksgraph train --resume {run_dir / other}`" in text
        assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before  # nothing written
        (run_dir / damaged).write_bytes(good[damaged])


def test_a_first_release_checkpoint_reads_with_one_notice(tmp_path, run):
    from conftest import ROOT

    old = ROOT / "tests" / "data" / "odd_net-dbeb482.pt"
    result = run("strip", old, "-o", tmp_path / "s.pt")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert text.count("carries no checksum") == 1 and text.startswith("Notice:")
    assert "read as it is: no checksum" in text
    with pytest.warns(UserWarning, match="carries no checksum"):
        load_checkpoint(old)
