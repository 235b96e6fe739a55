"""Errors the library raises; the CLI and the web app turn them into messages, never tracebacks."""

from __future__ import annotations


class ClipsearchError(Exception):
    """Base error: `message` says what went wrong, `hint` says how to fix it."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n{self.hint}"


class ModelNotAvailable(ClipsearchError):
    """A model could not be found locally and could not be fetched."""


class BundleError(ClipsearchError):
    """A model bundle folder is incomplete, corrupt or of an unknown format."""


class ImageError(ClipsearchError):
    """An image could not be decoded (corrupt, truncated, too large, not an image)."""


class CollectionError(ClipsearchError):
    """A collection is missing, inconsistent, or was built with another model."""


class UnreadableStoreError(CollectionError):
    """A collection's SQLite database cannot be read at all (not a database, or damaged): only `index --rebuild
    --model MODEL` (a new generation) or deleting the collection's folder gets past it."""


class QueryError(ClipsearchError):
    """A query is empty, too long, or refers to something that does not exist."""
