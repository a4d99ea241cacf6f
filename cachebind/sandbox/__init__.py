"""A pool of worker processes that run decoders on untrusted bytes, so that a decoder which
crashes, eats memory or spins costs one task its answer and nothing else.

    with Sandbox(settings.sandbox, preload=("cachebind.preprocess",)) as sandbox:
        pixels = sandbox.run(decode_fn, data, source="upload.png")       # sync
        pixels = await sandbox.run_async(decode_fn, data, source="x")    # from an event loop

Each worker is a fork of a template interpreter (``zygote``): a fresh ``sys.executable`` that
imported the preload and never runs a task (never a fork of the parent, which holds threads,
locks or CUDA state; nor ``multiprocessing``'s spawn, which would re-run the parent's main
script), so a replaced worker costs a fork, not an interpreter and its imports. A worker is
joined to the parent by a socket pair, with
- ``RLIMIT_AS`` = its idle footprint + ``memory_mb`` (an allocation past it raises
  ``MemoryError`` in the worker, or the kernel kills it),
- ``RLIMIT_CPU`` = the CPU time it has used + ``cpu_seconds``, renewed per task (the kernel
  sends ``SIGXCPU`` past it),
- ``RLIMIT_CORE`` = 0 (a crash leaves no core file behind),
and the parent enforces a wall-clock deadline per task. A worker that crashes, passes a cap,
overruns or whose task is abandoned (a cancelled ``run_async``) is killed and replaced; its task
raises ``InputError(source, reason, detail)``:

=================  =============================================================
``undecodable``    the worker died of a signal (``SIGSEGV``, ``SIGABRT`` …, named in the
                   detail) or exited, or ``fn`` raised something other than InputError
``too_large``      ``MemoryError`` under the memory cap, or killed by ``SIGKILL`` (OOM)
``too_slow``       past the deadline, or past the CPU cap (``SIGXCPU``)
=================  =============================================================

An ``InputError`` raised by ``fn`` itself comes back with its reason and detail, under the
task's ``source``. In front of the workers is a bounded queue: a task submitted while
``workers + max_queue`` tasks are in flight raises :class:`SandboxBusy` at once, carrying
``retry_after_s`` (an HTTP service answers 429).

``fn`` must be importable by name (a module-level function such as
``cachebind.preprocess.preprocess``): it travels by reference, its arguments by pickle. Results
come back pickled (protocol 5, one copy of an array's bytes each way: well under a millisecond
for a [3, 224, 224] float32 tensor); torch tensors travel as numpy arrays and are rebuilt with
``torch.from_numpy``. The parent unpickles results with an allow-list (plain Python data and
numpy arrays), so a worker whose decoder was subverted by a crafted input cannot make the parent
run code through its answer. The sandbox bounds resources and contains crashes; it is not a
system-call filter (a subverted worker could still read files the service can read).
"""

from cachebind.sandbox.pool import Sandbox, SandboxBusy, SandboxClosed, SandboxStats

__all__ = ["Sandbox", "SandboxBusy", "SandboxClosed", "SandboxStats"]
