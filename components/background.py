"""Long-running processes started in the background (the feature server, the local stack's
Prefect server, worker, MLflow UI and endpoint): each leaves a JSON record (pid, url, log,
start time) that later commands read to find it, and that a dead process's record does not
outlive."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_record(path: Path) -> dict | None:
    """The record at ``path`` if its process is alive (a stale record is removed)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not alive(int(record.get("pid", -1))):
        path.unlink(missing_ok=True)
        return None
    return record


def launch(cmd: list[str], log: Path, record_path: Path, ready: Callable[[], bool], timeout_s: float,
           cwd: Path | None = None, env: dict | None = None, **extra) -> dict:
    """Start ``cmd`` in a session of its own (it outlives the caller), wait until ``ready()``,
    write and return its record (``extra`` added). RuntimeError with the log's tail when it
    exits or is not ready in time (it is stopped then)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd,
                                env=env, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            why = f"exited with {proc.returncode}" if proc.poll() is not None else f"not ready after {timeout_s:.0f} s"
            stop_pid(proc.pid, 10)
            tail = log.read_text(errors="replace").strip().splitlines()[-15:]
            raise RuntimeError(f"{cmd[0]} {' '.join(cmd[1:3])} {why}; {log}:\n" + "\n".join(tail))
        time.sleep(0.5)
    record = {"pid": proc.pid, "log": str(log), "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              **extra}
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=1))
    return record


def stop_pid(pid: int, timeout_s: float = 30.0) -> None:
    """SIGTERM the process and its session's group (a server's workers too), SIGKILL after ``timeout_s``."""
    def send(sig: int) -> None:
        try:
            os.killpg(pid, sig)  # a session leader: the whole group
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    send(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while alive(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it when this process started it
        time.sleep(0.1)
    if alive(pid):
        send(signal.SIGKILL)


def stop_recorded(record_path: Path, timeout_s: float = 30.0) -> dict | None:
    """Stop the process a record names; returns the record, None if none was running."""
    record = read_record(record_path)
    if record is None:
        return None
    stop_pid(int(record["pid"]), timeout_s)
    record_path.unlink(missing_ok=True)
    return record
