"""Paths in the CLI's text listings: a file name may hold control characters (an escape sequence that clears the
screen or retitles the terminal, a newline that splits a line in two). Text listings show them escaped, as `ls -b`
does; --json, -0 and --paths-only into a pipe keep names exactly (--paths-only on a terminal escapes them too)."""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\\\\]")
_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\\": "\\\\"}


def shown_path(path: str) -> str:
    """`path` with control characters (and the backslash that introduces an escape) written as escapes."""
    return _CONTROL.sub(lambda m: _NAMED.get(m.group(), f"\\x{ord(m.group()):02x}"), path)
