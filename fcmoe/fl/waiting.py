"""One way to wait: ask until the answer is the awaited one or the time is up (the deployment's and the nodes'
polling loops)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll(check: Callable[[], T], done: Callable[[T], bool], timeout_s: float, interval_s: float) -> T:
    """Call ``check`` every ``interval_s`` seconds until ``done`` of its answer, or until ``timeout_s`` seconds have
    passed (it is asked at least once); its last answer either way. ``check`` may raise to stop waiting early."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = check()
        if done(answer) or time.monotonic() >= deadline:
            return answer
        time.sleep(interval_s)
