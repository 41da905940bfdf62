"""dksgraph/1 checkpoints: plain data only, written atomically and sealed, read with ``weights_only=True``.

A checkpoint is ``{"format": "dksgraph/1", "spec": <dict>, "model": state_dict, ...}``; training
adds ``optimizer``, ``scheduler``, ``epoch``, ``rng`` and ``metrics``. Nothing in it needs
unpickling arbitrary objects, so :func:`load_checkpoint` refuses files that do. Every file
:func:`atomic_save` writes carries a seal (:mod:`dksgraph.integrity`), verified by :func:`read_tensors`
before the file is read: a damaged file is refused with the tensor that changed.

Example::

    >>> save_checkpoint("init.pt", spec, model)          # doctest: +SKIP
    >>> load_checkpoint("init.pt")["format"]             # doctest: +SKIP
    'dksgraph/1'
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from dksgraph.errors import CheckpointError, WriteError, first_line
from dksgraph.integrity import ZIP, Seal, seal_file, verify, warn_unsealed
from dksgraph.names import CHECKPOINT_FORMAT as FORMAT, Key
from dksgraph.spec import parse_spec

__all__ = ["CHECKPOINT_ADVICE", "TEMP_SUFFIX", "Loaded", "atomic_save", "atomic_write", "checkpoint_spec", "link_file", "load_checkpoint",
           "read_tensors", "remove_stale_temps", "save_checkpoint", "strict_load"]


TEMP_SUFFIX = ".tmp"  # every file dksgraph writes is first `.NAME.XXXX.tmp` in the same folder
CHECKPOINT_ADVICE = ("Use another copy of it, or the run's other checkpoint (`best.pt` for `last.pt`, or the "
                     "reverse); `dksgraph verify FILE...` checks any number of files.")


class Loaded(dict):
    """A file's dictionary, with the :class:`~dksgraph.integrity.Seal` it was verified against before it was read."""

    seal: Seal


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None],
                 check: Callable[[Path], None] | None = None, seal: str | None = None) -> Path:
    """Write through a temp file in the same folder, fsync, rename, fsync the folder: a crash at any moment
    leaves either the old file or the new one, never a half-written one. The file gets the permissions
    the user's umask gives new files. A failed write (disk full, no permission) leaves nothing behind and
    raises :class:`WriteError` naming the path and the cause. ``seal`` (a kind of
    :mod:`dksgraph.integrity`) appends the file's checksum once it is written. ``check``, when given, reads
    the finished temp file back before it gets its name; whatever it raises leaves nothing behind either."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w+b" if seal else "wb") as f:
            write(f)
            if seal:
                seal_file(f, seal)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(Path(tmp))
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as exc:
        raise WriteError(
            f"could not write `{path}`: {exc.strerror or exc} (errno {exc.errno}). Nothing was half-written"
            f"{' and the previous file is intact' if path.exists() else ''}. Free some space, fix the folder's "
            "permissions, or write to another folder (`--out`, `-o`)."
        ) from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the temp files of writes that a killed process never finished (call with the folder's lock held)."""
    stale = [p for p in Path(folder).glob(f".*{TEMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def link_file(source: str | Path, target: str | Path) -> Path:
    """Make ``target`` the same file as ``source`` atomically: a hard link (no second write of a large
    checkpoint), or a copy where the file system has no hard links."""
    source, target = Path(source), Path(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.link{TEMP_SUFFIX}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        def copy(f: BinaryIO) -> None:
            with open(source, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)

        return atomic_write(target, copy)
    try:
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise WriteError(f"could not write `{target}`: {exc.strerror or exc}; the previous file is intact.") from None
    return target


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` with :func:`atomic_write`'s guarantee, sealed."""
    return atomic_write(path, lambda f: torch.save(obj, f), seal=ZIP)


def save_checkpoint(path: str | Path, spec, model: torch.nn.Module, **extra: Any) -> Path:
    """Save the model's state_dict and spec (plus training state in ``extra``) as a dksgraph/1 file."""
    payload = {Key.FORMAT: FORMAT, Key.SPEC: spec.model_dump(mode="json"), Key.MODEL: model.state_dict(), **extra}
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

    data = dict(ckpt[Key.SPEC])
    config = ckpt.get(Key.CONFIG) or {}
    legacy = {k: config[k] for k in _LEGACY_RECIPE if k in config}
    if legacy:
        data["train"] = {**(data.get("train") or {}), **legacy}
    data.setdefault("branch_copy", "blocks")
    data.setdefault("branch_init", "pytorch")
    return parse_spec(data, source=source)


def read_tensors(path: str | Path, what: str = "checkpoint", advice: str = CHECKPOINT_ADVICE,
                 notice: bool = True) -> Loaded:
    """A PyTorch file's dictionary, loaded with ``weights_only=True`` (never unpickling arbitrary objects) after
    its seal is verified (a damaged file raises a CheckpointError naming the tensor and ``advice``). A file
    without a seal (an earlier release's) is read with one notice, unless ``notice`` is False (files that
    other programs write, such as pretrained weights)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{what} `{path}` does not exist. Check the path; training writes `last.pt` and `best.pt` in "
            "its run folder, and `dksgraph augment SPEC --save FILE` writes an untrained one."
        )
    seal = verify(path, what, advice)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"`{path}` holds pickled Python objects that dksgraph will not load (loading them could run "
            f"arbitrary code): {first_line(exc)}. dksgraph reads plain tensors and data only; save a state_dict "
            "(or re-create the checkpoint with `dksgraph augment ... --save` or `dksgraph train`), or load it "
            "yourself if you trust it."
        ) from None
    except Exception as exc:  # a truncated zip, random bytes, an empty file
        raise CheckpointError(
            f"`{path}` is not a readable PyTorch file ({type(exc).__name__}: "
            f"{first_line(exc, 160)}). It may be truncated "
            "or not a checkpoint at all; use a file written by `dksgraph train`, `dksgraph augment --save` or "
            "`torch.save(model.state_dict(), ...)`."
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"`{path}` holds a {type(data).__name__}, not a dictionary of tensors; save a "
                              "state_dict (`torch.save(model.state_dict(), path)`).")
    if notice:
        warn_unsealed(seal, what)
    loaded = Loaded(data)
    loaded.seal = seal
    if hasattr(data, "_metadata"):  # a state_dict's per-module versions, which load_state_dict reads
        loaded._metadata = data._metadata
    return loaded


def load_checkpoint(path: str | Path) -> Loaded:
    """Load and check a dksgraph/1 checkpoint (its seal verified) without unpickling arbitrary objects."""
    data = read_tensors(path)
    if not isinstance(data, dict) or data.get(Key.FORMAT) != FORMAT:
        found = data.get(Key.FORMAT) if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(
            f"`{path}` is not a {FORMAT} checkpoint (format: {found!r}). dksgraph reads the files that "
            "`dksgraph train` and `dksgraph augment --save` write; a plain state_dict has no spec to rebuild "
            "the network from."
        )
    for key in ("spec", "model"):
        if key not in data:
            raise CheckpointError(f"`{path}` lacks the `{key}` entry every {FORMAT} checkpoint has; it is damaged.")
    if not isinstance(data[Key.MODEL], dict) or not all(isinstance(v, torch.Tensor) for v in data[Key.MODEL].values()):
        raise CheckpointError(f"`{path}`: its `model` entry is not a state_dict of tensors; the file is damaged.")
    return data


def strict_load(module: torch.nn.Module, state: dict, what: str, spec, assign: bool = False) -> None:
    """Load ``state`` into ``module`` with ``strict=True``, or raise a CheckpointError that counts the missing,
    unexpected and wrongly shaped entries and names ``spec``'s backbone (``what``: the weights, for the message)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} of the wrong shape (e.g. {'; '.join(wrong[:2])})")
        raise CheckpointError(
            f"{what} do not fit the network the spec describes (`{spec.backbone.model}`, "
            f"kwargs {dict(spec.backbone.kwargs)}): {', '.join(parts)} weights. The weights were saved from a "
            "different model or spec; use the checkpoint together with the spec it was trained with."
        )
    module.load_state_dict(state, strict=True, assign=assign)
