"""The decode sandbox: worker processes with a memory cap, a CPU cap and a deadline; a crash, a
cap or an overrun costs its own task an InputError and nothing else; a bounded queue; cancelled
async callers stop their work. Every test runs real processes and is bounded to seconds."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import sandbox_tasks as tasks
import torch

from cachebind.config import SandboxConfig, load_config
from cachebind.errors import InputError
from cachebind.sandbox import Sandbox, SandboxBusy, SandboxClosed


def config(**overrides) -> SandboxConfig:
    return SandboxConfig(**{"workers": 2, "timeout_s": 20.0, **overrides})


@pytest.fixture(scope="module")
def pool():
    with Sandbox(config(), preload=("sandbox_tasks",)) as sandbox:
        yield sandbox


def input_error(fn, *args, sandbox: Sandbox, source: str = "x", **kw) -> InputError:
    with pytest.raises(InputError) as caught:
        sandbox.run(fn, *args, source=source, **kw)
    return caught.value


def test_arrays_and_tensors_come_back_whole(pool: Sandbox) -> None:
    assert pool.wait_ready(60)
    array = pool.run(tasks.image_array, 2, source="a")
    np.testing.assert_array_equal(array, tasks.image_array(2))
    assert array.flags.writeable
    answer = pool.run(tasks.tensor_dict, source="t")
    assert isinstance(answer["pixels"], torch.Tensor) and answer["w"] == 4
    assert torch.equal(answer["pixels"], tasks.tensor_dict()["pixels"])


def test_input_errors_come_back_as_raised_and_bugs_as_undecodable(pool: Sandbox) -> None:
    error = input_error(tasks.refuse, "inner", sandbox=pool, source="upload.png")
    assert (error.source, error.reason, error.detail) == (
        "upload.png",
        "unsupported_format",
        "not an image at all",
    )
    error = input_error(tasks.bug, sandbox=pool)
    assert error.reason == "undecodable" and "KeyError" in error.detail


def test_a_worker_that_aborts_costs_its_own_task_and_nothing_else(pool: Sandbox) -> None:
    futures = {i: pool.submit(tasks.slow_echo, i, 0.1, source=f"ok{i}").future for i in range(8)}
    crash = pool.submit(tasks.abort, source="crash.wav").future
    futures.update(
        {i: pool.submit(tasks.slow_echo, i, 0.1, source=f"ok{i}").future for i in (8, 9)}
    )
    concurrent.futures.wait([*futures.values(), crash], timeout=30)
    with pytest.raises(InputError) as caught:
        crash.result(0)
    assert caught.value.reason == "undecodable" and "SIGABRT" in caught.value.detail
    assert caught.value.source == "crash.wav"
    assert {i: f.result(0) for i, f in futures.items()} == {i: i for i in range(10)}
    assert pool.run(tasks.echo, "after", source="x") == "after"


def test_memory_past_the_cap_is_too_large_and_the_worker_is_replaced() -> None:
    with Sandbox(config(workers=1, memory_mb=128), preload=("sandbox_tasks",)) as sandbox:
        before = sandbox.run(tasks.pid, source="x")
        error = input_error(tasks.allocate, 512, sandbox=sandbox, source="bomb.png")
        assert error.reason == "too_large" and "128 MiB" in error.detail
        assert sandbox.run(tasks.allocate, 16, source="small") == 16 * 1024 * 1024
        assert sandbox.run(tasks.pid, source="x") != before


def test_past_the_deadline_is_too_slow_and_the_worker_is_replaced() -> None:
    with Sandbox(config(workers=1, timeout_s=0.5), preload=("sandbox_tasks",)) as sandbox:
        before = sandbox.run(tasks.pid, source="x")
        started = time.monotonic()
        error = input_error(tasks.slow_echo, 1, 120.0, sandbox=sandbox, source="slow.mp4")
        assert time.monotonic() - started < 60  # ended by the deadline, not by the task
        assert error.reason == "too_slow" and "0.5 s" in error.detail
        assert sandbox.run(tasks.pid, source="x") != before
        # A per-call deadline beats the configured one.
        assert sandbox.run(tasks.slow_echo, 7, 1.0, source="x", timeout=5) == 7


def test_cpu_time_past_the_cap_is_too_slow() -> None:
    # The spin outlasts the cap under any load (a loaded machine gives it a fraction of a core);
    # quiet, the cap ends it after 1-2 CPU-seconds.
    cfg = config(workers=1, cpu_seconds=1, timeout_s=120.0)
    with Sandbox(cfg, preload=("sandbox_tasks",)) as sandbox:
        error = input_error(tasks.spin, 90.0, sandbox=sandbox, source="spin")
        assert error.reason == "too_slow" and "CPU-seconds" in error.detail
        assert sandbox.run(tasks.echo, 1, source="x") == 1


def test_a_full_queue_refuses_at_once_with_a_retry_hint() -> None:
    with Sandbox(config(workers=1, max_queue=1), preload=("sandbox_tasks",)) as sandbox:
        running = sandbox.submit(tasks.slow_echo, 1, 1.0, source="a")
        waiting = sandbox.submit(tasks.slow_echo, 2, 0.0, source="b")
        with pytest.raises(SandboxBusy) as caught:
            sandbox.submit(tasks.echo, 3, source="c")
        assert caught.value.retry_after_s >= 1
        assert (running.future.result(10), waiting.future.result(10)) == (1, 2)
        assert sandbox.run(tasks.echo, 3, source="c") == 3  # room again


def test_cancelling_run_async_kills_the_work_and_never_blocks_the_loop(tmp_path: Path) -> None:
    late = tmp_path / "late.txt"

    async def scenario(sandbox: Sandbox) -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        clock = asyncio.create_task(ticker())
        request = asyncio.create_task(
            sandbox.run_async(tasks.sleep_then_write, 1.5, str(late), source="v.mp4")
        )
        await asyncio.sleep(0.5)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        await asyncio.sleep(2.0)  # past the moment the task would have written
        answer = await sandbox.run_async(tasks.echo, "next", source="x")
        clock.cancel()
        assert answer == "next"
        return ticks

    with Sandbox(config(workers=1), preload=("sandbox_tasks",)) as sandbox:
        ticks = asyncio.run(scenario(sandbox))
    assert not late.exists()
    assert ticks > 100  # ~250 expected: the loop ran while the worker worked


def test_close_fails_what_waits_and_stops_the_workers() -> None:
    sandbox = Sandbox(config(workers=1, max_queue=4), preload=("sandbox_tasks",))
    sandbox.run(tasks.echo, 0, source="x")
    workers = [w for w in sandbox._workers if w is not None]
    running = sandbox.submit(tasks.slow_echo, 1, 5.0, source="a")
    queued = sandbox.submit(tasks.echo, 2, source="b")
    time.sleep(0.2)
    sandbox.close()
    for task in (running, queued):
        with pytest.raises((SandboxClosed, concurrent.futures.CancelledError)):
            task.future.result(5)
    assert workers
    for worker in workers:  # the processes themselves, not the pool's account of them
        wait_until_dead(worker.pid, timeout=10)
    with pytest.raises(SandboxClosed):
        sandbox.submit(tasks.echo, 3, source="c")


def test_the_sandbox_section_is_configured_like_every_other(monkeypatch) -> None:
    monkeypatch.setenv("CACHEBIND_SANDBOX__MEMORY_MB", "512")
    settings = load_config(sandbox={"workers": 3})
    assert (settings.sandbox.workers, settings.sandbox.memory_mb) == (3, 512)
    assert settings.sandbox.timeout_s > 0 and settings.sandbox.max_queue >= 0
    with pytest.raises(ValueError):
        SandboxConfig(workers=0)


def test_an_answer_that_is_not_plain_data_is_refused(pool: Sandbox) -> None:
    # Unpickling runs whatever callable the pickle names: only numpy and plain data pass.
    error = input_error(tasks.a_date, sandbox=pool, source="odd")
    assert error.reason == "undecodable" and "datetime" in error.detail
    assert pool.run(tasks.echo, [1, b"x" * 100_000, {"k": 2.5}], source="x") == [
        1,
        b"x" * 100_000,
        {"k": 2.5},
    ]


def wait_until_dead(pid: int, timeout: float = 60.0) -> None:
    """Until the kernel has finished killing ``pid`` (a zombie, or reaped already): a loaded
    machine can take longer than any fixed sleep."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} still alive {timeout} s after SIGKILL")


def test_a_worker_killed_while_idle_is_replaced_without_failing_the_next_task() -> None:
    with Sandbox(config(workers=1), preload=("sandbox_tasks",)) as sandbox:
        first = sandbox.run(tasks.pid, source="x")
        os.kill(first, signal.SIGKILL)
        wait_until_dead(first)  # dead while idle: before the next task is sent
        assert sandbox.run(tasks.echo, "fine", source="x") == "fine"
        assert sandbox.run(tasks.pid, source="x") != first


def test_workers_are_forks_of_one_template_and_a_killed_template_is_replaced() -> None:
    # A replaced worker costs a fork of the template (which imported the preload), not a new
    # interpreter: the workers' parent is the template, not this process.
    preload = ("cachebind.preprocess", "sandbox_tasks")  # the service's, and these tests'
    with Sandbox(config(workers=2), preload=preload) as sandbox:
        template = sandbox.run(tasks.parent_pid, source="x")
        assert template != os.getpid()
        assert len(os.listdir(f"/proc/{template}/task")) == 1  # one thread: safe to fork
        first = sandbox.run(tasks.pid, source="x")
        os.kill(first, signal.SIGKILL)
        wait_until_dead(first)
        assert sandbox.run(tasks.parent_pid, source="x") == template  # its successor: a fork
        # The template killed from outside takes its workers with it; the pool starts another.
        os.kill(template, signal.SIGKILL)
        wait_until_dead(template)
        assert sandbox.run(tasks.echo, "fine", source="x") == "fine"
        successor = sandbox.run(tasks.parent_pid, source="x")
        assert successor not in (template, os.getpid())
