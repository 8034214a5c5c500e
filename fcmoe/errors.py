"""How an exception is quoted in a one-line message, and why a hub load failed (a leaf: it imports no other fcmoe
module)."""

from __future__ import annotations

import os
import signal


class Stopped(KeyboardInterrupt):
    """A stop signal from outside (SLURM, Kubernetes, ``timeout`` and service managers send SIGTERM, then kill the
    job a grace period later), raised in the main thread as Ctrl-C raises KeyboardInterrupt, and handled the same
    way: the round in hand is dropped, the last checkpoint stands, the command says how to continue."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message, or its type's name when it has none (a one-line error quotes this)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def hub_offline() -> str:
    """The variable that turns hub access off (``HF_HUB_OFFLINE``, or for data sets ``HF_DATASETS_OFFLINE``) as the
    user, the environment or ``make`` set it, or "" when access is on. fcmoe never sets them, so every child
    process (sweep workers, Ray actors, deployed nodes) inherits the same decision."""
    return next((name for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
                 if os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}), "")


def why_hub_failed(err: BaseException) -> str:
    """Why loading from the hub failed, in words that tell "not cached and offline" from "hub unreachable"."""
    reason = first_line(err)
    offline = hub_offline()
    if offline:
        return (f"not in the local Hugging Face cache, and hub access is off ({offline} is set): unset {offline} "
                f"to download it ({reason[:120]})")
    chain = [err, err.__cause__, err.__context__]
    if "connect" in reason.lower() or any(type(e).__name__ in _CONNECTION_ERRORS for e in chain if e is not None):
        return f"the hub is unreachable ({reason[:160]}): check the network or proxy, or set HF_HUB_OFFLINE=1"
    return reason[:200]


_CONNECTION_ERRORS = {"ConnectionError", "ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException"}
