"""dksgraph/1 checkpoints: plain data only, written atomically, read with ``weights_only=True``.

A checkpoint is ``{"format": "dksgraph/1", "spec": <dict>, "model": state_dict, ...}``; training
adds ``optimizer``, ``scheduler``, ``epoch``, ``rng`` and ``metrics``. Nothing in it needs
unpickling arbitrary objects, so :func:`load_checkpoint` refuses files that do.

Example::

    >>> save_checkpoint("init.pt", spec, model)          # doctest: +SKIP
    >>> load_checkpoint("init.pt")["format"]             # doctest: +SKIP
    'dksgraph/1'
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from dksgraph.errors import CheckpointError

FORMAT = "dksgraph/1"


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write through a temp file in the same folder, fsync, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def link_file(source: str | Path, target: str | Path) -> Path:
    """Make ``target`` the same file as ``source`` atomically: a hard link (no second write of a large
    checkpoint), or a copy where the file system has no hard links."""
    source, target = Path(source), Path(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        atomic_write(target, lambda f: f.write(source.read_bytes()))
        return target
    try:
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` with :func:`atomic_write`'s guarantee."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(path: str | Path, spec, model: torch.nn.Module, **extra: Any) -> Path:
    """Save the model's state_dict and spec (plus training state in ``extra``) as a dksgraph/1 file."""
    payload = {"format": FORMAT, "spec": spec.model_dump(mode="json"), "model": model.state_dict(), **extra}
    return atomic_save(payload, path)


# recipe fields that checkpoints of the first release kept in `config` instead of the spec's `train:`
_LEGACY_RECIPE = ("method", "dataset", "data_dir", "epochs", "batch_size", "seed", "train_subset", "test_subset")


def checkpoint_spec(ckpt: dict[str, Any], source: str):
    """The spec a checkpoint's run trained with: its whole recipe in ``train:``, and the branch layout and
    initialisation its weights were made with.

    Checkpoints of the first release kept the command-line part of the recipe (method, dataset, epochs,
    batch size, seed, subsets) in ``config``; it is folded back into ``train:`` here. They also predate
    segment branches and branch initialisation like the backbone's: their spec gets
    ``branch_copy: blocks`` and ``branch_init: pytorch``, which rebuild the branches they hold.
    """
    from dksgraph.spec import parse_spec

    data = dict(ckpt["spec"])
    config = ckpt.get("config") or {}
    legacy = {k: config[k] for k in _LEGACY_RECIPE if k in config}
    if legacy:
        data["train"] = {**(data.get("train") or {}), **legacy}
    data.setdefault("branch_copy", "blocks")
    data.setdefault("branch_init", "pytorch")
    return parse_spec(data, source=source)


def read_tensors(path: str | Path, what: str = "checkpoint") -> dict[str, Any]:
    """A PyTorch file's dictionary, loaded with ``weights_only=True`` (never unpickling arbitrary objects)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{what} `{path}` does not exist. Check the path; training writes `last.pt` and `best.pt` in "
            "its run folder, and `dksgraph augment SPEC --save FILE` writes an untrained one."
        )
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"`{path}` holds pickled Python objects that dksgraph will not load (loading them could run "
            f"arbitrary code): {first[:200]}. dksgraph reads plain tensors and data only; save a state_dict "
            "(or re-create the checkpoint with `dksgraph augment ... --save` or `dksgraph train`), or load it "
            "yourself if you trust it."
        ) from None
    except Exception as exc:  # a truncated zip, random bytes, an empty file
        raise CheckpointError(
            f"`{path}` is not a readable PyTorch file ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0][:160] if str(exc).strip() else 'no detail'}). It may be truncated "
            "or not a checkpoint at all; use a file written by `dksgraph train`, `dksgraph augment --save` or "
            "`torch.save(model.state_dict(), ...)`."
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"`{path}` holds a {type(data).__name__}, not a dictionary of tensors; save a "
                              "state_dict (`torch.save(model.state_dict(), path)`).")
    return data


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and check a dksgraph/1 checkpoint without unpickling arbitrary objects."""
    data = read_tensors(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(
            f"`{path}` is not a {FORMAT} checkpoint (format: {found!r}). dksgraph reads the files that "
            "`dksgraph train` and `dksgraph augment --save` write; a plain state_dict has no spec to rebuild "
            "the network from."
        )
    for key in ("spec", "model"):
        if key not in data:
            raise CheckpointError(f"`{path}` lacks the `{key}` entry every {FORMAT} checkpoint has; it is damaged.")
    if not isinstance(data["model"], dict) or not all(isinstance(v, torch.Tensor) for v in data["model"].values()):
        raise CheckpointError(f"`{path}`: its `model` entry is not a state_dict of tensors; the file is damaged.")
    return data
