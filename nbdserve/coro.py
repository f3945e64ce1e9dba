"""Eager start of awaitables and the notion of "who is running" used by the locks.

Owns:
  * ``start(awaitable, done)``: run a coroutine (or any awaitable: the ``Pending`` a layer hands
    back, e.g. a storage future) synchronously until it first suspends, and keep driving it from
    future callbacks afterwards.  A request whose work needs no waiting never gets here (each
    layer completes it synchronously and returns None); one that waits costs no
    ``asyncio.Task``.  ``done(result, exc)`` is called exactly once.
  * ``current_owner()``: the identity a lock records as its holder.  Inside ``start`` it is the
    eager runner; inside an ordinary task it is the task.

Invariants: a coroutine run by ``start`` only awaits asyncio futures (or ``asyncio.sleep(0)``),
never needs ``asyncio.current_task()`` and is never cancelled (the server drains requests instead).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Generator
from typing import Any

_current: _Runner | None = None


def current_owner() -> object:
    """The running eager runner or asyncio task (``None`` outside both)."""
    return _current if _current is not None else asyncio.current_task()


class _Runner:
    __slots__ = ("__weakref__", "coro", "done")

    def __init__(self, coro: Generator[Any, None, Any], done: Callable[[Any, BaseException | None], None]):
        self.coro = coro  # the awaitable's iterator (``__await__()``)
        self.done = done

    def step(self, exc: BaseException | None = None) -> None:
        global _current
        previous, _current = _current, self
        try:
            fut = self.coro.send(None) if exc is None else self.coro.throw(exc)
        except StopIteration as stop:
            _current = previous
            self.done(stop.value, None)
            return
        except BaseException as error:
            _current = previous
            self.done(None, error)
            return
        _current = previous
        if fut is None:  # bare yield, as asyncio.sleep(0) does
            asyncio.get_running_loop().call_soon(self.step)
        else:
            fut._asyncio_future_blocking = False
            fut.add_done_callback(self.wakeup)

    def wakeup(self, fut: asyncio.Future) -> None:
        try:
            fut.result()
        except BaseException as error:
            self.step(error)
        else:
            self.step()


def start(awaitable: Awaitable[Any], done: Callable[[Any, BaseException | None], None]) -> None:
    """Run ``awaitable`` now, up to its first suspension; ``done(result, exc)`` when it finishes."""
    _Runner(awaitable.__await__(), done).step()
