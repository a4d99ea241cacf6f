"""Killing a Ray Train run's training worker as soon as it has a checkpoint, for the tests that
check that a killed run resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

MANAGER_SNAPSHOT = "checkpoint_manager_snapshot.json"


def registered_step(snapshot: Path) -> int | None:
    """The step of the latest checkpoint Ray Train's controller has registered."""
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (OSError, ValueError):
        return None
    return None if latest is None else int(latest["metrics"]["step"])


def _train_worker_pids() -> set[int]:
    """The processes of this cluster's live Ray Train workers (``RayTrainWorker`` actors), from
    the GCS's actor table: it needs no dashboard, and a process is its actor's whatever started
    it (another cluster's or an ended run's workers are not in it, or not alive)."""
    from ray._private.state import state

    return {
        int(actor["Pid"])
        for actor in state.actor_table(None).values()
        if actor.get("ActorClassName") == "RayTrainWorker"
        and actor.get("State") == "ALIVE"
        and actor.get("Pid")
    }


def log_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


def kill_after_a_checkpoint(
    log: Path, snapshot: Path, thread: threading.Thread, timeout_s: float = 600
) -> tuple[int, list[str]]:
    """SIGKILL the training worker of the run that ``thread`` drives (it logs to ``log``) as
    soon as Ray Train's controller has registered a checkpoint (in ``snapshot``); returns the
    registered step it resumes from and the log lines written before the kill.

    The worker is found first, so that the kill follows the registration at once: the loop may
    run at most a checkpoint or two past it (a report waits for the controller to take the
    previous one; the controller polls the workers every 2 s), never to the end of the run."""
    deadline = time.monotonic() + timeout_s
    pids: set[int] = set()
    while not pids and thread.is_alive() and time.monotonic() < deadline:
        # Once this run has logged a step, its worker is up (an earlier run's are gone).
        pids = _train_worker_pids() if log.is_file() else set()
        time.sleep(0.05)
    assert pids, "no training worker process found: " + (
        "the run ended first" if not thread.is_alive() else f"none within {timeout_s:.0f} s"
    )
    while registered_step(snapshot) is None and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    # Read after the kill: nothing more can be registered, so this is the checkpoint the
    # restarted worker resumes from.
    resumed_at = registered_step(snapshot)
    assert resumed_at is not None, "no checkpoint was registered before the kill"
    return resumed_at, log_lines(log)
