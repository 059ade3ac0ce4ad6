"""The micro-batcher: worker threads run every model call; requests that arrive together share a forward.

Requests are tokenized by the HTTP handlers (outside the workers) and queued here. A free worker takes the first
queued request, then waits at most ``max_wait_s`` for more, up to ``max_batch_texts`` texts, and runs them
as one batch (whatever their adapters) on its own model replica; when that batch fails, each request runs again
alone, so one request cannot fail the others. Model changes (attach, detach) are queued as tasks in the same FIFO
and run as a barrier: the worker that takes one waits until the others' batches are done, and no worker takes
anything until the change is made, so requests queued before an unload finish before it, and those after it
never see a half-changed model.

Several workers (one per replica, :mod:`lora_train.serving.replicas`) pay off on a CPU: PyTorch releases the GIL
inside each operation, so two forwards on one torch thread each keep two cores busy, where one forward on two
threads spends much of its time synchronising small matrix products.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from lora_train.serving.registry import ServingError
from lora_train.startup import heap_release

log = logging.getLogger("lora_train.serving")
HEAP_RELEASE_INTERVAL_S = 2.0
"""After a batch, a worker hands the C heap's free pages back to the OS (:func:`lora_train.startup.heap_release`)
when this long has passed since it was last done, by any worker. The call takes about 2 ms, but the pages it returns
are faulted in again by the next batches: every 0.25 s it cost 6% of a server's requests/s, every 2 s about 1%
(within the noise), for 748 to 752 MB instead of 769 to 804 under load (docs/serving.md, "Free heap memory handed
back"). Only a batch releases: a server that goes idle keeps what it held after its last one."""
RunBatch = Callable[[list[tuple[str, list]]], list[Any]]
"""A model's forward over queued requests ``(adapter, features)``: one result (or exception) per request."""


@dataclass
class Job:
    """One classification request: its adapter, its tokenized texts, and the future its result goes to."""

    adapter: str
    features: list[dict[str, list[int]]]
    future: Future = field(default_factory=Future)


@dataclass
class Task:
    """A model change run by the worker between batches."""

    run: Callable[[], Any]
    future: Future = field(default_factory=Future)


@dataclass
class BatchStats:
    """Counters for /healthz: how many batches the workers ran, how many requests and texts they held, and the
    seconds they spent running them, summed over workers (against wall time: how busy the model replicas are)."""

    batches: int = 0
    requests: int = 0
    texts: int = 0
    busy_s: float = 0.0


class MicroBatcher:
    """Queue of jobs and tasks served by worker threads (see the module docstring)."""

    def __init__(
        self,
        run_batch: RunBatch | Sequence[RunBatch],
        max_batch_texts: int = 64,
        max_wait_s: float = 0.005,
        max_queued_texts: int = 4096,
        batching: bool = True,
        heap_release_interval_s: Optional[float] = HEAP_RELEASE_INTERVAL_S,
    ):
        """``run_batch``: the forward of one model, or one per replica (a worker each). ``heap_release_interval_s``:
        see :data:`HEAP_RELEASE_INTERVAL_S`; None never releases."""
        self._runners = list(run_batch) if isinstance(run_batch, Sequence) else [run_batch]
        self.max_batch_texts = max_batch_texts
        self.max_wait_s = max_wait_s
        self.max_queued_texts = max_queued_texts
        self.batching = batching
        self._heap_release = heap_release() if heap_release_interval_s is not None else None
        self._heap_release_interval_s = heap_release_interval_s or 0.0
        self._heap_released_at = time.monotonic()
        self.stats = BatchStats()
        self._queue: deque = deque()
        self._queued_texts = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._running = 0  # batches being run by workers (a task waits until none is)
        self._changing = False  # a task was taken: no worker takes anything until it is done
        self._threads: list[threading.Thread] = []

    @property
    def workers(self) -> int:
        return len(self._runners)

    def start(self) -> None:
        self._threads = [
            threading.Thread(target=self._loop, args=(run,), name=f"model-worker-{k}", daemon=True)
            for k, run in enumerate(self._runners)
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return bool(self._threads) and all(thread.is_alive() for thread in self._threads)

    def submit(self, adapter: str, features: list[dict[str, list[int]]]) -> Future:
        """Queue a classification; 503 when the queue already holds ``max_queued_texts`` texts."""
        return self.submit_together([(adapter, features)])[0]

    def submit_together(self, requests: list[tuple[str, list[dict[str, list[int]]]]]) -> list[Future]:
        """Queue classifications ``(adapter, features)`` back to back, so that the worker takes them into one batch
        (a fan-out request: one text, several adapters), as far as ``max_batch_texts`` allows; all or none are
        queued (503 when the queue would hold more than ``max_queued_texts`` texts)."""
        jobs = [Job(adapter, features) for adapter, features in requests]
        texts = sum(len(job.features) for job in jobs)
        with self._cond:
            if self._queued_texts + texts > self.max_queued_texts:
                raise ServingError(
                    503,
                    f"server busy: {self._queued_texts} texts already queued"
                    f" (limit {self.max_queued_texts}); retry later",
                )
            self._queue.extend(jobs)
            self._queued_texts += texts
            self._cond.notify()
        return [job.future for job in jobs]

    def call(self, run: Callable[[], Any]) -> Future:
        """Run ``run()`` on the worker after everything queued so far (for model changes)."""
        task = Task(run)
        with self._cond:
            self._queue.append(task)
            self._cond.notify()
        return task.future

    def _loop(self, run_batch: Callable) -> None:
        while True:
            with self._cond:
                while (not self._queue or self._changing) and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    self._fail_queued()
                    return
                first = self._queue.popleft()
                if isinstance(first, Task):
                    self._changing = True
                    while self._running:  # the other workers' batches, taken before this task, finish first
                        self._cond.wait()
                else:
                    self._running += 1  # before gathering: the lock is released while it waits for more jobs
                    batch = self._gather(first)
            if isinstance(first, Task):
                self._run_task(first)
            else:
                self._run_jobs(batch, run_batch)
            with self._cond:
                if isinstance(first, Task):
                    self._changing = False
                else:
                    self._running -= 1
                self._cond.notify_all()

    def _gather(self, first: Job) -> list[Job]:
        """``first`` plus the jobs that arrive within ``max_wait_s``, up to ``max_batch_texts`` (lock held)."""
        batch, texts = [first], len(first.features)
        deadline = time.monotonic() + self.max_wait_s
        while self.batching and texts < self.max_batch_texts:
            if not self._queue:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping:
                    break
                self._cond.wait(remaining)
                continue
            head = self._queue[0]
            if not isinstance(head, Job) or texts + len(head.features) > self.max_batch_texts:
                break
            batch.append(self._queue.popleft())
            texts += len(head.features)
        self._queued_texts -= texts
        return batch

    def _run_jobs(self, batch: list[Job], run_batch: Callable) -> None:
        start = time.perf_counter()
        try:
            results = run_batch([(job.adapter, job.features) for job in batch])
        except Exception as err:  # noqa: BLE001 - the requests get a 500 with the reason; the worker keeps serving
            if len(batch) == 1:
                log.exception("request failed")
                results = [ServingError(500, f"inference failed: {type(err).__name__}: {err}")]
            else:
                # One request can fail a shared forward (a text the model cannot take): run each alone, so only
                # the requests that fail by themselves get the error.
                log.warning(
                    "batch of %d requests failed (%s: %s); running them one by one", len(batch), type(err).__name__, err
                )
                results = [self._run_alone(job, run_batch) for job in batch]
        with self._cond:
            self.stats.busy_s += time.perf_counter() - start
            self.stats.batches += 1
            self.stats.requests += len(batch)
            self.stats.texts += sum(len(job.features) for job in batch)
        for job, result in zip(batch, results, strict=True):
            if isinstance(result, Exception):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)
        self._release_heap()  # after the answers, so no request waits for it

    def _release_heap(self) -> None:
        now = time.monotonic()
        if self._heap_release is not None and now - self._heap_released_at >= self._heap_release_interval_s:
            self._heap_released_at = now  # unlocked: two workers may both release once, which is harmless
            self._heap_release()

    @staticmethod
    def _run_alone(job: Job, run_batch: Callable) -> Any:
        try:
            return run_batch([(job.adapter, job.features)])[0]
        except Exception as err:  # noqa: BLE001 - this request's own failure
            log.exception("request for adapter %r failed", job.adapter)
            return ServingError(500, f"inference failed: {type(err).__name__}: {err}")

    @staticmethod
    def _run_task(task: Task) -> None:
        try:
            task.future.set_result(task.run())
        except Exception as err:  # noqa: BLE001 - handed to whoever asked for the change
            task.future.set_exception(err)

    def _fail_queued(self) -> None:
        while self._queue:
            self._queue.popleft().future.set_exception(ServingError(503, "server is shutting down"))
