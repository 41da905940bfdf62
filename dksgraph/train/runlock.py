"""One run per folder: ``run.lock`` names the process training there (pid, host, start time).

A second ``dksgraph train`` on the same folder is refused with the holder's pid and host; a lock
left by a process that no longer exists on this host (killed, machine rebooted) is taken over, and so
is one left by a SLURM job that the scheduler no longer runs (a killed job, or an earlier start of this
same job before it was requeued, on whatever node). The lock file is created with ``O_CREAT | O_EXCL``,
so of two runs started at the same moment exactly one gets it, on one machine and across the nodes of a
cluster whose shared file system makes an exclusive create atomic: local file systems, NFS version 3
and later (the server checks it), Lustre, GPFS/Spectrum Scale, BeeGFS; not NFSv2.

Example::

    >>> with RunLock("runs/r32"):           # doctest: +SKIP
    ...     train()
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from dksgraph.errors import DksError
from dksgraph.names import RunFile

__all__ = ["RunLock"]



class RunLock:
    """``run.lock`` in ``folder``, held from :meth:`acquire` to :meth:`release` (a context manager)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / RunFile.LOCK
        self.held = False
        self.taken_over: dict | None = None

    def acquire(self) -> RunLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "process_start": _process_start(os.getpid()), "slurm_job": os.environ.get("SLURM_JOB_ID")}
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                holder = _read(self.path)
                if holder is None:  # being written this instant, or a write that never finished
                    if time.time() - _mtime(self.path) > 10:
                        self.path.unlink(missing_ok=True)
                    else:
                        time.sleep(0.1)
                    continue
                if _stale(holder):
                    self.taken_over = holder
                    self.path.unlink(missing_ok=True)
                    continue
                raise DksError(
                    f"`{self.folder}` is in use by another `dksgraph train`: pid {holder.get('pid')} on "
                    f"{holder.get('host')}, started {_ago(holder.get('started'))} ago. Wait for it to finish, stop "
                    f"it, or pick another `--out`; if that process no longer exists, delete `{self.path}`."
                ) from None
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
            self.held = True
            return self
        raise DksError(f"could not take `{self.path}`: other processes keep taking it; pick another `--out`.")

    def release(self) -> None:
        if self.held:
            holder = _read(self.path)
            if holder is not None and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _stale(holder: dict) -> bool:
    """The holder is gone: a SLURM job that is this job's earlier start or no longer runs, or a process of
    this host that has exited (or whose pid now belongs to another process)."""
    job = holder.get("slurm_job")
    if job:
        return job == os.environ.get("SLURM_JOB_ID") or not _job_running(str(job))
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    start = holder.get("process_start")
    return start is not None and _process_start(pid) not in (None, start)


def _job_running(job: str) -> bool:
    """Whether SLURM still runs ``job`` (True when that cannot be asked: a lock is never taken on a guess)."""
    if shutil.which("squeue") is None:
        return True
    done = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True)
    if done.returncode != 0:
        return "Invalid job id" not in done.stderr  # a job the scheduler has forgotten is gone
    return done.stdout.strip() in ("RUNNING", "COMPLETING", "SUSPENDED", "CONFIGURING", "STOPPED", "SIGNALING")


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _ago(started) -> str:
    if not isinstance(started, (int, float)):
        return "some time"
    seconds = max(0, int(time.time() - started))
    return f"{seconds // 3600} h {seconds % 3600 // 60} min" if seconds >= 3600 else f"{seconds // 60} min {seconds % 60} s"
