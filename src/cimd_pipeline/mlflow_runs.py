"""Close MLflow runs whose ``kedro run`` process died without closing them.

kedro-mlflow ends its run in ``after_pipeline_run`` or ``on_pipeline_error``, but a process killed
by SIGKILL (the OOM killer, a scheduler's pre-emption, ``kill -9``) or SIGTERM runs neither hook,
and MLflow then shows the run as RUNNING forever. So each run records which process owns it
(host, PID and the process's start time, which tells a reused PID apart), and when the next run
starts on the same host every RUNNING run of the experiment whose owner is gone is marked KILLED.
Runs owned by another host, or without these tags, are left alone: we cannot see their process.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)

TAG_HOST = "cimd.owner.host"
TAG_PID = "cimd.owner.pid"
TAG_START = "cimd.owner.start"
KILLED = "KILLED"


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (Linux only), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def process_start(pid: int) -> str | None:
    """``<boot id>:<start ticks>`` of a process: tells a reused PID (or a reboot) apart."""
    fields = _proc_stat(pid)
    if fields is None:
        return None
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "?"
    return f"{boot}:{fields[19]}"  # field 22 of stat; fields[0] is field 3 (the state)


def owner_tags() -> dict[str, str]:
    """Tags naming this process as the owner of the active run."""
    tags = {TAG_HOST: socket.gethostname(), TAG_PID: str(os.getpid())}
    start = process_start(os.getpid())
    if start is not None:
        tags[TAG_START] = start
    return tags


def is_alive(pid: int, start: str | None) -> bool:
    """Whether process ``pid`` still runs and is the one that started at ``start`` (when known)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    fields = _proc_stat(pid)
    if fields is not None and fields[0] in ("Z", "X"):
        return False  # a zombie waiting for its parent: already dead
    current = process_start(pid)
    return start is None or current is None or current == start


def close_dead_runs(client: MlflowClient, experiment_id: str, current_run_id: str) -> list[str]:
    """Mark KILLED every RUNNING run of the experiment owned by a dead process on this host."""
    host = socket.gethostname()
    closed = []
    running = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'")
    for run in running:
        tags = run.data.tags
        if run.info.run_id == current_run_id or tags.get(TAG_HOST) != host or TAG_PID not in tags:
            continue
        if is_alive(int(tags[TAG_PID]), tags.get(TAG_START)):
            continue
        client.set_terminated(run.info.run_id, KILLED)
        closed.append(run.info.run_id)
        logger.warning(
            "MLflow run %s (%s) was left RUNNING by process %s, which no longer exists: marked %s",
            run.info.run_id,
            run.info.run_name,
            tags[TAG_PID],
            KILLED,
        )
    return closed
