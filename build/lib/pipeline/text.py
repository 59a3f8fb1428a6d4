"""Text for people: an error as one line, and a plain aligned table. Used by every room and by ``jobs/``."""

from __future__ import annotations

import re
from typing import Sequence

_RAISED = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|Exit)): (.+)$", re.MULTILINE)


def one_line(error: BaseException | str, limit: int = 300) -> str:
    """An error as one short line: the innermost user exception's message when Ray wraps it.

    Unwrapping stops at this project's own errors, ValueErrors and OSErrors: their messages already say which
    file, what went wrong and what to do, while their causes (e.g. a raw OpenSlideError) say less. Other
    errors keep their type's name in front."""

    def ours(e: BaseException) -> bool:
        return isinstance(e, (ValueError, OSError)) or type(e).__module__.startswith(("pipeline.", "unet."))

    if isinstance(error, BaseException):
        inner, seen = error, set()
        while id(inner) not in seen and not ours(inner):  # RayTaskError.cause -> UserCodeException -> the user's
            seen.add(id(inner))
            cause = getattr(inner, "cause", None)
            following = cause if isinstance(cause, BaseException) else inner.__cause__
            if following is None:
                break
            inner = following
        text = str(inner) if ours(inner) else f"{type(inner).__name__}: {inner}"
        if type(inner).__module__.startswith("ray."):  # cause lost in transit: take it from the remote traceback
            found = [m for m in _RAISED.findall(str(error)) if not m[0].startswith("ray.") and "UserCode" not in m[0]]
            text = f"{found[-1][0].rsplit('.', 1)[-1]}: {found[-1][1]}" if found else text
    else:
        text = error
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool] | None = None) -> str:
    """Columns padded to their widest cell (``right[i]``: right-aligned, for numbers), a rule under the header;
    trailing spaces dropped, so a long last column (a status, a path) never pads the others."""
    table = [list(header)] + [list(row) for row in rows]
    right = list(right) if right is not None else [False] * len(header)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if r else cell.ljust(w) for cell, w, r in zip(row, widths, right)).rstrip()
             for row in table]  # fmt: skip
    lines.insert(1, "-" * len(lines[0]))  # under the header: a long last cell (a failure reason) does not widen it
    return "\n".join(lines)
