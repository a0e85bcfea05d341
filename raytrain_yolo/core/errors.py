"""The one exception type that reaches users as a single line, and Ultralytics' refusals made into such lines."""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A mistake the user can fix: the message names the problem and the fix. Exit status 2, no traceback."""


def ultralytics_says(e: BaseException, p: Path | None = None) -> str:
    """An Ultralytics message as one plain line: no colours, emoji, download notes or help links."""
    from ultralytics.utils import remove_colorstr

    text = remove_colorstr(str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)).replace("\u274c", "")
    lines = [x.strip() for x in text.splitlines() if x.strip() and not x.strip().startswith(("Note ", "See https"))]
    line = " ".join(" ".join(lines).split()).rstrip(".")
    if p is not None and line.startswith(str(p)):
        line = line[len(str(p)):].strip()
    return f"Ultralytics says {line}" if line else f"Ultralytics refuses it ({type(e).__name__})"
