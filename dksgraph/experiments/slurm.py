"""Grid runs as SLURM jobs, through submitit: one job per run (one job array per submission), requeued on
preemption or before the time limit, resumed exactly from ``last.pt``.

:func:`submit` sends every run that is neither done nor already queued; the jobs run :class:`RunJob`
on the nodes, which brings its run from wherever it stands to done with the same commands as the local
runner (:func:`dksgraph.experiments.grid.commands`): a new run is trained, an interrupted one resumed, a
trained one scored. :func:`states` tells each run's state from its folder and from the scheduler.

* **Time limits and preemption**: jobs ask for ``SIGUSR2`` :attr:`SlurmOptions.signal_s` seconds before
  their time limit (``--signal=USR2@S``); submitit then calls :meth:`RunJob.checkpoint`, which sends
  SIGTERM to the training process (it saves ``last.pt`` at its next step and exits 143) and has the job
  requeued. A training process that gets SIGTERM from the scheduler itself (a preemption, ``scancel
  --signal=TERM``) also exits 143, and the job asks to be requeued. Either way the requeued job resumes
  from ``last.pt``, bit for bit (CPU) as if never stopped.
* **Several nodes**: a run with ``nodes_per_run`` N gets N tasks, each of which starts one torchrun agent
  (``--nnodes N --rdzv-backend c10d --rdzv-endpoint HOST:PORT``, HOST the job's first node, PORT from the
  job id); only the first task scores the run afterwards.

Every process of a job gets ``OMP_NUM_THREADS`` = its CPUs divided by the processes on its node, so that
1 node x 2 processes and 2 nodes x 1 process compute with the same thread count (and agree bit for bit).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dksgraph.checkpoint import atomic_write
from dksgraph.errors import DksError, close_matches
from dksgraph.experiments import grid as grid_lib
from dksgraph.experiments.grid import SlurmOptions
from dksgraph.names import RunFile

__all__ = ["JOB_FILE", "RunJob", "check_cluster", "job_of", "parse_time", "queued", "states", "submit"]

JOB_FILE = "slurm.json"  # in a run folder: the job that runs it (id, log files)
_MIN_WORK_S = 60  # a time limit must leave at least this long before the signal to save


def parse_time(text: str | int) -> int:
    """A SLURM time limit (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``) in seconds."""
    value = str(text).strip()
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value)
    if not match:
        raise DksError(f"`--time {value}` is not a SLURM time limit; write minutes (`90`), `HH:MM:SS` (`04:00:00`) "
                       "or `D-HH:MM:SS` (`2-00:00:00`).")
    days, a, b, c = (int(g) if g else None for g in match.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        return days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if b is None:
        return a * 60  # MM
    if c is None:
        return a * 60 + b  # MM:SS
    return a * 3600 + b * 60 + c


@dataclass
class RunJob:
    """What a SLURM job runs: one grid run, brought to done (submitit pickles it; it runs on every task)."""

    run: grid_lib.Run
    options: SlurmOptions

    def __call__(self) -> str:
        import submitit

        env = submitit.JobEnvironment()
        # the first task decides where the run stands (every task must run the same command) and tells the others
        agreed = self.run.folder / f".state-{env.job_id}-{os.environ.get('SLURM_RESTART_COUNT', '0')}"
        if env.global_rank == 0:
            state = grid_lib.status(self.run)
            if state == "new":
                grid_lib.prepare(self.run)
            for old in self.run.folder.glob(".state-*"):  # earlier starts' (their tasks have all read them)
                old.unlink(missing_ok=True)
            atomic_write(agreed, lambda f: f.write(state.encode()))
        else:
            _wait_for(agreed)
            state = agreed.read_text()
        if state == "done":
            return "done"
        device = "cuda" if self.options.gpus_per_run else "cpu"
        for cmd in grid_lib.commands(self.run, state, device):
            training = cmd[3] == "train"
            if not training and env.global_rank != 0:
                break  # the first task scores the run
            code = self._execute(self._launcher(cmd, env) if training else cmd, env)
            if code == 143:  # SIGTERM from the scheduler: last.pt is saved; continue in a requeued job
                _requeue(env.job_id)
                sys.exit(-1)
            if code != 0:
                tail = _last_line(self.run.folder / RunFile.LOG)
                raise RuntimeError(f"{self.run.id}: `{' '.join(cmd[2:5])}` exited with {code}: {tail}")
        return "done"

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Called by submitit on the time limit's signal: the training process saves and stops, then the job
        is requeued with this same RunJob (which resumes from last.pt)."""
        import submitit

        proc = _RUNNING.get("proc")
        if proc is not None and _running(proc.pid):
            # not proc.wait(): this handler interrupted the main thread inside proc.wait(), which holds its lock
            os.killpg(proc.pid, signal.SIGTERM)
            deadline = time.time() + max(10, self.options.signal_s - 15)
            while _running(proc.pid) and time.time() < deadline:
                time.sleep(0.2)  # past the deadline, the last finished (atomic) save is where the job resumes
        return submitit.helpers.DelayedSubmission(RunJob(self.run, self.options))

    def _launcher(self, cmd: list[str], env) -> list[str]:
        """``python -m dksgraph train ...`` as one process, or under torchrun when the run has several."""
        nproc, agents = self.options.processes_per_agent, self.options.agents
        if agents == 1 and nproc == 1:
            return cmd
        job = int(re.sub(r"\D", "", os.environ.get("SLURM_JOB_ID", "0")) or 0)
        endpoint = f"{_node_address(env.hostnames[0])}:{20000 + job % 40000}"
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(agents), "--nproc-per-node",
                str(nproc), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", str(env.job_id),
                "-m", "dksgraph", *cmd[3:]]

    def _execute(self, cmd: list[str], env) -> int:
        os_env = dict(os.environ)
        os_env["OMP_NUM_THREADS"] = str(max(1, self.options.cpus_per_run // self.options.processes_per_agent))
        with open(self.run.folder / RunFile.LOG, "a") as log:
            log.write(f"$ {' '.join(cmd)}  # SLURM job {env.job_id}, task {env.global_rank}\n")
            log.flush()
            # its own process group (checkpoint() signals the whole of it), and SIGUSR2 ignored: the scheduler's
            # signal goes to every process of the job, and only submitit's handler acts on it
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os_env, start_new_session=True,
                                    preexec_fn=lambda: signal.signal(signal.SIGUSR2, signal.SIG_IGN))
            _RUNNING["proc"] = proc
            try:
                while True:
                    try:
                        return proc.wait()
                    except InterruptedError:
                        continue
            finally:
                _RUNNING.pop("proc", None)


_RUNNING: dict[str, subprocess.Popen] = {}  # the job's training process, for RunJob.checkpoint (not pickled)


def _running(pid: int) -> bool:
    """The process exists and has not exited (a zombie waiting to be reaped has)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _wait_for(path: Path, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not path.is_file():
        if time.time() > deadline:
            raise RuntimeError(f"`{path}` did not appear within {timeout:g} s (the job's first task writes it)")
        time.sleep(0.5)


def _requeue(job_id: str) -> None:
    subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)


def _node_address(node: str) -> str:
    """The address of a SLURM node (its NodeAddr, which is its hostname unless the cluster says otherwise)."""
    done = subprocess.run(["scontrol", "show", "node", node, "-o"], capture_output=True, text=True)
    match = re.search(r"\bNodeAddr=(\S+)", done.stdout)
    return match.group(1) if match else node


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1][:300] if lines else "(empty log)"


# ------------------------------------------------------------------------------------------ the scheduler side

def check_cluster(options: SlurmOptions) -> None:
    """Refuse, before anything is submitted, what the scheduler would refuse or what could not end well."""
    if shutil.which("sbatch") is None or shutil.which("squeue") is None:
        raise DksError("SLURM is not available on this machine (no `sbatch`/`squeue` on PATH). Run this on a SLURM "
                       "login node, or start a one-node cluster for trying it: `sudo bash tools/slurm.sh start`. "
                       "Nothing was submitted.")
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise DksError("`--slurm` submits through submitit, which is not installed: `pip install "
                       "'dksgraph[cluster]'`. Nothing was submitted.") from None
    seconds = parse_time(options.time)
    if seconds < options.signal_s + _MIN_WORK_S:
        raise DksError(f"a time limit of {options.time} ({seconds} s) leaves no room to train and save: a job gets "
                       f"its stop signal {options.signal_s} s before the limit and needs time to save `last.pt`; "
                       f"give `--time` at least {(options.signal_s + _MIN_WORK_S) // 60 + 1} minutes. Nothing was "
                       "submitted.")
    if options.partition:
        done = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True)
        known = [p.rstrip("*") for p in done.stdout.split()]
        if done.returncode != 0:
            raise DksError(f"`sinfo` failed ({done.stderr.strip()[:200]}): is SLURM running? Nothing was submitted.")
        if options.partition not in known:
            hint = close_matches(options.partition, known)
            raise DksError(f"SLURM has no partition `{options.partition}` (it has {', '.join(known) or 'none'})"
                           f"{'; did you mean ' + hint + '?' if hint else ''}. Pick one with `--partition`. Nothing "
                           "was submitted.")


def queued(job_ids: list[str]) -> dict[str, str]:
    """The scheduler's state of each job still in its queue (PENDING, RUNNING, ...); others are absent."""
    if not job_ids:
        return {}
    # every job in the queue, one line per array element (a job id no longer there would fail a `-j` query)
    done = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T"], capture_output=True, text=True)
    wanted = set(job_ids)
    out = {}
    for line in done.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in wanted:
            out[parts[0]] = parts[1]
    return out


def job_of(run: grid_lib.Run) -> dict | None:
    try:
        return json.loads((run.folder / JOB_FILE).read_text())
    except (OSError, ValueError):
        return None


def states(runs: list[grid_lib.Run]) -> list[tuple[grid_lib.Run, str, str, str]]:
    """(run, state, job id, detail) per run: ``done``, ``pending``/``running``/... (the scheduler's word),
    ``failed`` (its job left the queue before the run was done; detail: the log's last line), ``not submitted``."""
    jobs = {r.id: job_of(r) for r in runs}
    in_queue = queued([j["job_id"] for j in jobs.values() if j])
    out = []
    for run in runs:
        job = jobs[run.id]
        local = grid_lib.status(run)
        if local == "done":
            out.append((run, "done", job["job_id"] if job else "", ""))
        elif job and job["job_id"] in in_queue:
            out.append((run, in_queue[job["job_id"]].lower(), job["job_id"], f"log {job['stderr']}"))
        elif job:
            out.append((run, "failed", job["job_id"], _last_line(run.folder / RunFile.LOG)))
        else:
            out.append((run, "not submitted", "", local))
    return out


def submit(runs: list[grid_lib.Run], options: SlurmOptions, log_dir: Path, name: str) -> list[tuple[grid_lib.Run, str]]:
    """Submit every run that is neither done nor queued as one job array; returns (run, job id) of each job."""
    import submitit

    check_cluster(options)
    todo = [run for run, state, _, _ in states(runs) if state in ("failed", "not submitted")]
    if not todo:
        return []
    executor = submitit.AutoExecutor(folder=log_dir / "%j", cluster="slurm")
    extra = {"requeue": True, **options.extra}
    gpus = options.gpus_per_run // options.nodes_per_run if options.gpus_per_run else None
    executor.update_parameters(
        name=f"dksgraph-{name}", timeout_min=max(1, parse_time(options.time) // 60), nodes=options.nodes_per_run,
        tasks_per_node=options.tasks_per_node, cpus_per_task=options.cpus_per_run, gpus_per_node=gpus,
        slurm_partition=options.partition, slurm_signal_delay_s=options.signal_s,
        slurm_array_parallelism=options.max_parallel or len(todo), slurm_additional_parameters=extra,
        **({"slurm_account": options.account} if options.account else {}),
        **({"slurm_qos": options.qos} if options.qos else {}))
    with executor.batch():
        jobs = [executor.submit(RunJob(run, options)) for run in todo]
    out = []
    for run, job in zip(todo, jobs):
        run.folder.mkdir(parents=True, exist_ok=True)
        record = {"job_id": job.job_id, "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr),
                  "submitted": time.time()}
        (run.folder / JOB_FILE).write_text(json.dumps(record, indent=1) + "\n")
        out.append((run, job.job_id))
    return out
