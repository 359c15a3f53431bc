"""Short error messages: one line, a few hundred characters at most.

A message names the problem and the valid choices; it never dumps a whole list of tensor
names, sites or values (a 2,000-layer config once produced a 430 KB "missing tensors" error).
``cap_list`` shows the first few items of a list and counts the rest; ``short_repr`` shortens
one value.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

__all__ = ["cap_list", "short_repr"]


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` on one line, cut to ``limit`` characters."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def cap_list(items: Iterable[Any], limit: int = 5, width: int = 160,
             fmt: Callable[[Any], str] = short_repr) -> str:
    """``[a, b, c, ... and N more]``: at most ``limit`` items and about ``width`` characters.

    Identical to ``repr(list(items))`` when the list is short (for strings and numbers).
    """
    items = list(items)
    shown: list[str] = []
    used = 0
    for item in items[:limit]:
        text = fmt(item)
        if shown and used + len(text) > width:
            break
        shown.append(text)
        used += len(text) + 2
    rest = len(items) - len(shown)
    return "[" + ", ".join(shown) + (f", ... and {rest} more" if rest else "") + "]"
