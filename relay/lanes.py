"""Run tasks in order per key, different keys in parallel on a small pool of threads.

Every task touching one libvirt object (a live event, a reconcile check, a statistics sample)
runs in that object's lane, so changes of one object are submitted in order and never race.
A lane blocked in a slow libvirt call holds one worker; lanes of other objects go on. A task
that raises is reported to ``on_failure`` (the supervisor counts it) and its worker goes on.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Hashable

from relay.supervision import Supervisor

Task = Callable[[], None]


class Lanes:
    """A pool of ``workers`` threads running tasks FIFO per key; keys take turns."""

    def __init__(self, workers: int, name: str = "lane", supervisor: Supervisor | None = None):
        if workers < 1:
            raise ValueError("Lanes needs at least one worker")
        self.name = f"{name}-lanes"
        self.supervisor = supervisor or Supervisor()
        self.supervisor.watch(self.name, alive=self._alive)
        self._cond = threading.Condition()
        self._queues: dict[Hashable, deque[Task]] = {}  # a key is here while it has work
        self._ready: deque[Hashable] = deque()  # keys with work that no worker holds
        self._stopping = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(workers)]

    def start(self) -> None:
        """Start the worker threads."""
        for thread in self._threads:
            thread.start()

    def submit(self, key: Hashable, task: Task) -> None:
        """Queue ``task`` behind the earlier tasks of ``key``; never blocks."""
        with self._cond:
            if self._stopping:
                return
            queue = self._queues.get(key)
            if queue is None:
                self._queues[key] = deque([task])
                self._ready.append(key)
                self._cond.notify()
            else:
                queue.append(task)

    def _alive(self) -> bool:
        return self._stopping or all(t.is_alive() or not t.ident for t in self._threads)

    def pending(self) -> int:
        """Tasks queued or running."""
        with self._cond:
            return sum(len(queue) for queue in self._queues.values())

    def stop(self, timeout: float = 5.0) -> None:
        """Drop queued tasks and wait up to ``timeout`` for running ones to return."""
        with self._cond:
            self._stopping = True
            self._ready.clear()
            self._cond.notify_all()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._ready and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                key = self._ready.popleft()
                task = self._queues[key][0]
            try:
                task()
            except Exception as exc:
                self.supervisor.failed(self.name, exc)
            with self._cond:
                queue = self._queues[key]
                queue.popleft()
                if not queue:
                    del self._queues[key]
                elif not self._stopping:
                    self._ready.append(key)
                    self._cond.notify()
