"""Text that can be stored and tokenised: a Python str may hold lone surrogates (undecodable bytes from
argv or file names under surrogateescape, or "\\ud800" from JSON), which are not valid UTF-8."""

from __future__ import annotations


def is_utf8(text: str) -> bool:
    """True when `text` encodes as UTF-8 (no lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
