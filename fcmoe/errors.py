"""How an exception is quoted in a one-line message (a leaf: it imports no other fcmoe module)."""

from __future__ import annotations


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message, or its type's name when it has none (a one-line error quotes this)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
