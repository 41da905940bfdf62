"""Deployment file formats: write a classifier, read the file back, verify it, and only then keep it.

* ``state_dict``: ``torch.save(module.state_dict())`` plus a JSON sidecar (``FILE.json``: the model,
  its kwargs, input size, number of classes, the classifier) from which
  :func:`dksgraph.deploy.exports.load_exported` rebuilds the module in one line; ``main``'s state_dict
  loads into the model's own class too.
* ``exported``: a ``torch.export`` program with a dynamic batch size (``torch.export.save``);
  ``torch.export.load(path).module()`` runs it with no dksgraph import.
* ``onnx``: ONNX with a dynamic batch size (PyTorch's dynamo exporter; the ``export`` extra).
* ``torchscript``: a TorchScript module (scripted, else traced; deprecated upstream, kept for old runtimes).

Every file is written under a temporary name in its folder, sealed (:mod:`dksgraph.integrity`: a
checksum inside the file, which plain PyTorch, onnx and onnxruntime skip; the sidecar carries its own),
read back, its seal verified, and checked against the classifier's output on two probe batches (sizes
2 and 3): ``torch.equal`` for state_dict, exported and TorchScript; onnxruntime's output within
:data:`ONNX_TOLERANCE` x max(1, max |logit|). A file that fails is removed, and nothing is written
under the final name. :func:`load` verifies the seals before it reads.

This module is file I/O only: rebuilding a state_dict's module is the caller's ``rebuild(sidecar)``.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

from dksgraph.checkpoint import atomic_write, read_tensors
from dksgraph.errors import CheckpointError, DksError, first_line
from dksgraph.integrity import PROTOBUF, ZIP, seal_json, verify, verify_json, warn_unsealed
from dksgraph.names import EXPORT_FORMATS as FORMATS, EXPORT_SUFFIXES as SUFFIXES

__all__ = ["Check", "EXPORT_ADVICE", "ONNX_TOLERANCE", "Rebuild", "SIDECAR", "identical", "load", "write"]

Rebuild = Callable[[dict], nn.Module]  # a sidecar -> the untrained module whose state_dict the file holds
SIDECAR = "dksgraph-export/2"  # sealed (a `checksum` field)
_UNSEALED_SIDECAR = "dksgraph-export/1"  # earlier releases' sidecars, read with a notice
EXPORT_ADVICE = ("Export it again from its checkpoint (`dksgraph export CKPT ...`, or `dksgraph strip CKPT` for the "
                 "original network).")
ONNX_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Check:
    """How a written file was verified."""

    fmt: str
    max_abs_diff: float
    tolerance: float | None  # None: bit for bit

    def describe(self) -> str:
        if self.tolerance is None:
            return "equal bit for bit (torch.equal) on probe batches of 2 and 3"
        return (f"max abs difference {self.max_abs_diff:.2e} <= tolerance {self.tolerance:.2e} (onnxruntime, probe "
                "batches of 2 and 3)")


def write(module: nn.Module, path: str | Path, fmt: str, probes: list[torch.Tensor], sidecar: dict,
          rebuild: Rebuild) -> Check:
    """Write ``module`` as ``fmt`` to ``path`` if, read back, it reproduces ``module`` on ``probes``
    (a state_dict is read back into ``rebuild(sidecar)``).

    The file goes through :func:`~dksgraph.checkpoint.atomic_write`: converted first, saved under a
    temporary name, read back and checked there, and only then renamed (a state_dict's sidecar lands
    just before it); a conversion, a check or a write that fails leaves nothing behind."""
    if fmt not in SUFFIXES:
        raise DksError(f"unknown export format `{fmt}`; choose one of {', '.join(FORMATS)}.")
    if fmt == "onnx":
        _need_onnx()
    module.eval()
    with torch.no_grad():
        wanted = [module(x) for x in probes]
    program = _CONVERTERS[fmt](module, probes[0])
    checks: list[Check] = []

    def check(tmp: Path) -> None:
        checks.append(_check(fmt, _reader(fmt, tmp, sidecar, rebuild), probes, wanted))
        if fmt == "state_dict":
            atomic_write(_sidecar(Path(path)), lambda f: f.write(seal_json(sidecar)))

    atomic_write(path, lambda f: _SAVERS[fmt](program, f), check, seal=_SEALS[fmt])
    return checks[0]


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``torch.equal``, with NaNs at the same positions counted equal (an untrained ResNet-1202 overflows)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)))


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _check(fmt: str, run: Callable[[torch.Tensor], torch.Tensor], probes, wanted) -> Check:
    got = [run(x) for x in probes]
    diffs = [(g.float() - w.float()).abs().max().item() if g.shape == w.shape else float("inf")
             for g, w in zip(got, wanted)]
    if fmt != "onnx":
        for x, g, w, diff in zip(probes, got, wanted, diffs):
            if not identical(g, w):
                raise DksError(f"the {fmt} file does not reproduce the classifier (max abs difference {diff:.3g} on a "
                               f"batch of {len(x)}); nothing was written. Please report this with the spec.")
        return Check(fmt, 0.0, None)
    tolerance = ONNX_TOLERANCE * max(1.0, max(float(w.abs().max()) for w in wanted))
    if max(diffs) > tolerance:
        raise DksError(f"the ONNX file differs from the classifier by up to {max(diffs):.3g} under onnxruntime "
                       f"(tolerance {tolerance:.3g}); nothing was written. Export `--format exported` instead, and "
                       "please report this with the spec.")
    return Check(fmt, max(diffs), tolerance)


# ------------------------------------------------------------------------------------------ writers and readers

def _batch_dim():
    return torch.export.Dim("batch", min=1, max=1 << 16)


def _convert_exported(module: nn.Module, x: torch.Tensor):
    try:
        return torch.export.export(module, (x,), dynamic_shapes=({0: _batch_dim()},))
    except Exception as exc:
        raise DksError(f"torch.export could not capture this classifier ({type(exc).__name__}: {first_line(exc)}); "
                       "nothing was written. Try `--format state_dict` or `--format onnx`.") from None


def _convert_onnx(module: nn.Module, x: torch.Tensor):
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            return torch.onnx.export(module, (x,), dynamo=True, dynamic_shapes=({0: _batch_dim()},),
                                     input_names=["images"], output_names=["logits"], verbose=False)
    except Exception as exc:
        raise DksError(f"the ONNX exporter could not convert this classifier ({type(exc).__name__}: "
                       f"{first_line(exc)}); nothing was written. Try `--format exported`.") from None


def _convert_torchscript(module: nn.Module, x: torch.Tensor):
    try:  # torch.jit is deprecated upstream but still the portable format of older runtimes
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return torch.jit.script(module)
            except Exception:
                return torch.jit.trace(module, x)
    except Exception as exc:
        raise DksError(f"TorchScript export failed ({first_line(exc)}); nothing was written. Use `--format "
                       "exported` or `--format state_dict`.") from None


def _save_torch(program, f) -> None:  # a state_dict
    torch.save(program, f)


def _through_memory(save: Callable[[BinaryIO], None], f: BinaryIO) -> None:
    """``save`` into memory, then one plain write to ``f``: torch.export's archive writer cannot recover from
    a failed write to a file (a full disk ends the process in C++) and ONNX's takes the file's name for a
    path, while a failed plain write raises the OSError that names the cause."""
    buffer = io.BytesIO()
    save(buffer)
    f.write(buffer.getbuffer())


def _save_exported(program, f) -> None:
    _through_memory(lambda buffer: torch.export.save(program, buffer), f)


def _save_onnx(program, f) -> None:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        _through_memory(program.save, f)


def _save_torchscript(program, f) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(program, f)


# a file-format's conversion (errors: the model cannot be captured) apart from its saving (errors: the disk)
_CONVERTERS = {"state_dict": lambda module, x: module.state_dict(), "exported": _convert_exported,
               "onnx": _convert_onnx, "torchscript": _convert_torchscript}
_SAVERS = {"state_dict": _save_torch, "exported": _save_exported, "onnx": _save_onnx,
           "torchscript": _save_torchscript}
_SEALS = {"state_dict": ZIP, "exported": ZIP, "onnx": PROTOBUF, "torchscript": ZIP}  # every format is a zip but ONNX


def _reader(fmt: str, path: Path, sidecar: dict, rebuild: Rebuild) -> Callable[[torch.Tensor], torch.Tensor]:
    """The written file as a function, read after its seal is verified (a state_dict's by read_tensors)."""
    if fmt != "state_dict":
        verify(path, f"the {fmt} file just written")
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.cpu().numpy()})[0])
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.jit.load(str(path), map_location="cpu")
        return _no_grad(program)
    if fmt == "exported":
        return _no_grad(torch.export.load(str(path)).module())
    return _no_grad(_from_state_dict(path, json.loads(json.dumps(sidecar)), rebuild, notice=False))  # as read back


def _no_grad(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(x)

    return run


def _need_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise DksError(f"ONNX export needs onnx, onnxscript and onnxruntime ({exc.name} is missing); install them "
                       "with `pip install 'dksgraph[export]'`, or use `--format exported`.") from None


def load(path: str | Path, rebuild: Rebuild) -> nn.Module:
    """The module in an export file: a ``.pt2`` program, or a state_dict loaded into ``rebuild(sidecar)``, each
    read after its seal (and the sidecar's) is verified."""
    path = Path(path)
    sidecar = _sidecar(path)
    if path.suffix == ".pt2" or not sidecar.is_file() and _is_archive(path):
        if not path.is_file():
            raise CheckpointError(f"exported program `{path}` does not exist. Check the path.")
        warn_unsealed(verify(path, "exported program", EXPORT_ADVICE), "exported program")
        try:
            return torch.export.load(str(path)).module()
        except Exception as exc:
            raise CheckpointError(f"`{path}` is not a readable torch.export program ({type(exc).__name__}); it may "
                                  "be truncated.") from None
    if not sidecar.is_file():
        raise CheckpointError(f"`{sidecar}` is missing: dksgraph rebuilds a state_dict from the JSON file `dksgraph "
                              "export` writes beside it. Keep the two together (or load the state_dict into the "
                              "model's own class yourself).")
    info, seal = verify_json(sidecar, "export sidecar", sealed_formats=(SIDECAR,), advice=EXPORT_ADVICE)
    if info.get("format") not in (SIDECAR, _UNSEALED_SIDECAR):
        raise CheckpointError(f"`{sidecar}` is not a dksgraph export sidecar ({SIDECAR}); it is damaged.")
    warn_unsealed(seal, "export sidecar")
    return _from_state_dict(path, info, rebuild)


def _from_state_dict(path: Path, info: dict, rebuild: Rebuild, notice: bool = True) -> nn.Module:
    """The module a sidecar describes, holding the state_dict at ``path`` (its seal verified), in eval mode."""
    module = rebuild(info)
    module.load_state_dict(read_tensors(path, "exported state_dict", EXPORT_ADVICE, notice), strict=True)
    return module.eval()


def _is_archive(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("archive_format") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
