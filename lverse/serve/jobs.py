"""The request queue of ``lverse serve``: one model, one request at a time, in order.

A :class:`Job` is one request (text -> image, image -> text, a round trip). The web handlers
:meth:`JobQueue.submit` it and answer at once with its id; one worker thread runs the jobs one
after another, so a model never draws for two requests at once (its memory and the CPU/GPU are
used by one draw), and every waiting request knows its place (:meth:`JobQueue.position`).

A job reports as it goes (``stage``, tokens drawn out of ``total``, a preview image) and checks
its cancel flag at every token drawn (:meth:`Job.tick`): cancelling a waiting job takes it out of
the queue, cancelling a running one stops its decoding at the next token. Finished jobs are kept
(the newest ``keep_finished``) so their results and images can still be fetched.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("lverse.serve")

QUEUED, RUNNING, DONE, ERROR, CANCELLED = "queued", "running", "done", "error", "cancelled"
FINISHED = (DONE, ERROR, CANCELLED)


class Cancelled(Exception):
    """Raised inside a running job (at its next token) once it has been cancelled."""


class QueueFull(Exception):
    """The queue already holds its limit of waiting requests."""


@dataclass(eq=False)
class Job:
    """One request: what to run, and what the page reads while it runs and after."""

    kind: str  # "text-to-image", "image-to-text", "round-trip-text", "round-trip-image"
    run: Callable[["Job"], dict[str, Any]]  # does the work; returns the result (JSON-able)
    id: str = field(default_factory=lambda: secrets.token_hex(6))
    state: str = QUEUED
    stage: str = "waiting"  # what it is doing now, in words the page shows
    tokens: int = 0  # tokens drawn so far, all candidates together ...
    total: int = 0  # ... out of this many
    preview: bytes | None = None  # PNG of the partly decoded candidates
    preview_version: int = 0
    result: dict[str, Any] | None = None
    error: str | None = None
    files: dict[str, bytes] = field(default_factory=dict)  # PNGs served under the job's URL
    data: dict[str, Any] = field(default_factory=dict)  # what lazily served files are made from
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    first_preview_s: float | None = None  # seconds from start to the first preview (the page's first image)
    cancel_flag: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)

    def tick(self, tokens: int = 0) -> None:
        """Count ``tokens`` drawn; raise :class:`Cancelled` if the job was cancelled."""
        self.tokens += tokens
        if self.cancel_flag.is_set():
            raise Cancelled()

    def begin(self, stage: str, total: int | None = None) -> None:
        """Enter a new stage (e.g. "drawing images"); ``total`` restarts the token count."""
        self.tick()
        self.stage = stage
        if total is not None:
            self.tokens, self.total = 0, total

    def set_preview(self, png: bytes) -> None:
        if self.first_preview_s is None and self.started is not None:
            self.first_preview_s = time.time() - self.started
        self.preview = png
        self.preview_version += 1


class JobQueue:
    """Jobs in order of arrival, run one at a time by one worker thread.

    ``max_waiting`` bounds the waiting jobs (a further submit raises :class:`QueueFull`);
    ``keep_finished`` bounds the finished jobs remembered. :meth:`start` starts the worker
    (the web app does so when it starts; a queue not started only collects jobs)."""

    def __init__(self, max_waiting: int = 16, keep_finished: int = 64) -> None:
        self.max_waiting, self.keep_finished = max_waiting, keep_finished
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._running: Job | None = None
        self._thread: threading.Thread | None = None
        self._stop = False

    # --- the handlers' side ----------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        with self._cond:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"the queue is full ({self.max_waiting} requests waiting); try again later")
            self._waiting.append(job)
            self._jobs[job.id] = job
            self._forget_old()
            self._cond.notify_all()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def position(self, job: Job) -> int | None:
        """How many requests are ahead of ``job``: 0 while it runs, None once it is finished."""
        with self._cond:
            if job.state == RUNNING:
                return 0
            if job.state != QUEUED:
                return None
            ahead = 1 if self._running is not None else 0
            for other in self._waiting:
                if other is job:
                    return ahead
                ahead += 1
            return None

    def cancel(self, job: Job) -> None:
        """A waiting job leaves the queue now; a running one stops at its next token."""
        with self._cond:
            job.cancel_flag.set()
            if job.state == QUEUED:
                self._waiting.remove(job)
                self._finish(job, CANCELLED)

    def counts(self) -> dict[str, Any]:
        with self._cond:
            return {"waiting": len(self._waiting), "running": self._running.id if self._running else None,
                    "max_waiting": self.max_waiting}

    # --- the worker ------------------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="lverse-serve-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel whatever runs or waits and stop the worker."""
        with self._cond:
            self._stop = True
            for job in list(self._waiting):
                self.cancel(job)
            if self._running is not None:
                self._running.cancel_flag.set()
            self._cond.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                job = self._waiting.popleft()
                self._running = job
                job.state, job.started = RUNNING, time.time()
            state = DONE
            try:
                job.result = job.run(job)
            except Cancelled:
                state = CANCELLED
            except (ValueError, OSError, RuntimeError) as e:
                # The library's one-line messages for bad input (the CLI prints the same ones).
                state, job.error = ERROR, " ".join(str(e).split()) or type(e).__name__
                log.info("job %s (%s) failed: %s", job.id, job.kind, job.error)
            except Exception as e:  # a bug: keep serving, but say what happened
                log.exception("job %s (%s) crashed", job.id, job.kind)
                state, job.error = ERROR, f"internal error: {type(e).__name__}: {e}"
            with self._cond:
                self._running = None
                self._finish(job, state)

    def _finish(self, job: Job, state: str) -> None:
        job.state, job.ended = state, time.time()
        job.stage = state
        job.finished.set()
        self._cond.notify_all()

    def _forget_old(self) -> None:
        done = [j for j in self._jobs.values() if j.state in FINISHED]
        for job in done[: max(0, len(done) - self.keep_finished)]:
            del self._jobs[job.id]
