"""The critic in a process of its own (``train.overlap_critic`` with ``train.critic_worker=process``).

With the critic in a second thread of the loop's process, the two roles' Python (dynamo guards, hooks, optimizer
steps, autograd's bookkeeping) takes turns on one GIL. On a 2-core AMX Xeon four actor and four critic updates side by
side took 1.14-1.33x longer in two threads than in two processes (``bench/bench_critic_worker.py``,
``docs/ppo.md``). The worker is a one-process
``ProcessPoolExecutor`` (spawned: the loop's process runs vLLM's and OpenMP's threads, which a fork would copy in an
undefined state), so calls run in the order they were made and come back as ordinary futures.

Arguments and results cross as ``pickle`` bytes made at the call: a tensor is copied when the call is made, so the
loop may go on writing into its own tensors (torch's own multiprocessing pickler would move them into shared memory
instead, where a later in-place write of the loop would reach the critic).
"""

from __future__ import annotations

import os
import pickle
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context

_CRITIC = None  # the worker process's CriticTrainer


def _build(cfg, model_path: str, threads: int) -> int:
    global _CRITIC
    import torch

    from ppo.actor import CriticTrainer

    torch.set_num_threads(threads)
    _CRITIC = CriticTrainer(cfg, model_path)
    return os.getpid()


def _call(name: str, payload: bytes) -> bytes:
    args = pickle.loads(payload)
    return pickle.dumps(getattr(_CRITIC, name)(*args), protocol=pickle.HIGHEST_PROTOCOL)


class CriticDied(RuntimeError):
    """The critic's process exited (killed, out of memory, a crash in native code) before answering."""


class _Result:
    """The future of one call: unpickles the worker's answer; a dead worker becomes :class:`CriticDied`."""

    def __init__(self, inner: Future, owner: "CriticProcess", name: str):
        self._inner, self._owner, self._name = inner, owner, name

    def done(self) -> bool:
        return self._inner.done()

    def result(self, timeout=None):
        try:
            return pickle.loads(self._inner.result(timeout))
        except BrokenProcessPool as e:
            raise CriticDied(f"the critic process (pid {self._owner.pid}) exited during {self._name}() "
                             f"({self._owner.exit_note()}); the run's last checkpoint is intact: rerun with "
                             f"resume=true") from e


class CriticProcess:
    """A :class:`ppo.actor.CriticTrainer` in a spawned process. ``submit(name, *args)`` returns a future of
    ``critic.name(*args)``; ``critic.name(*args)`` on this object waits for it (checkpoints, digests)."""

    def __init__(self, cfg, model_path: str, threads: int):
        self._pool = ProcessPoolExecutor(1, mp_context=get_context("spawn"))
        self.pid, self._procs = None, []
        self._ready = _Ready(self._pool.submit(_build, cfg, model_path, threads), self)

    def wait_ready(self) -> None:
        """Block until the worker has built its critic (errors while building surface here, with the worker's
        traceback)."""
        if self.pid is None:
            self.pid = self._ready.result()
            self._procs = self._pool_processes()  # the pool forgets them once it breaks: kept for the exit code

    def _pool_processes(self) -> list:
        return list((getattr(self._pool, "_processes", None) or {}).values())  # the pool's own (private) map

    def exit_note(self) -> str:
        procs = self._procs or self._pool_processes()
        # The pool's manager thread reaps a dead worker too: whichever thread's waitpid comes second sees no child
        # and no code yet, so ask again until the reaping thread has recorded it.
        deadline = time.monotonic() + 10
        codes = [p.exitcode for p in procs if p.exitcode is not None]
        while procs and not codes and time.monotonic() < deadline:
            time.sleep(0.02)
            codes = [p.exitcode for p in procs if p.exitcode is not None]
        if not codes:
            return "no exit code"
        code = codes[0]
        return f"exit code {code}" + (f", signal {-code}" + (": killed, e.g. out of memory" if code == -9 else "")
                                      if code < 0 else "")

    def submit(self, name: str, *args) -> _Result:
        self.wait_ready()
        payload = pickle.dumps(args, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            inner = self._pool.submit(_call, name, payload)
        except BrokenProcessPool as e:
            raise CriticDied(f"the critic process (pid {self.pid}) is gone ({self.exit_note()})") from e
        return _Result(inner, self, name)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args: self.submit(name, *args).result()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class _Ready(_Result):
    """The future of the worker's start: the worker's pid, once its critic is built."""

    def __init__(self, inner: Future, owner: CriticProcess):
        super().__init__(inner, owner, "its start")

    def result(self, timeout=None):
        try:
            return self._inner.result(timeout)
        except BrokenProcessPool as e:
            raise CriticDied(f"the critic process exited while building the critic ({self._owner.exit_note()})") from e
