"""Finding image files: a recursive walk that skips hidden and tool folders, honours --exclude globs,
and reports (instead of raising on) folders it cannot read and names SQLite cannot store."""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from clipsearch.preprocess import IMAGE_SUFFIXES

# Folders that hold tooling or caches, not photos.
SKIPPED_DIR_NAMES = frozenset({
    "node_modules", "__pycache__", "venv", ".venv", "site-packages", "@eaDir", "$RECYCLE.BIN",
    "System Volume Information", ".Trash", ".Trashes", ".thumbnails", ".cache", ".git", ".hg", ".svn",
})


@dataclass(frozen=True)
class WalkOptions:
    exclude: tuple[str, ...] = ()
    include_hidden: bool = False
    follow_symlinks: bool = False
    suffixes: frozenset[str] = frozenset(IMAGE_SUFFIXES)


@dataclass(frozen=True)
class FoundFile:
    """An image file: absolute path (as a str, the store's key), size in bytes and mtime in ns."""

    path: str
    size: int
    mtime_ns: int


@dataclass
class WalkResult:
    files: list[FoundFile] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    roots: list[str] = field(default_factory=list)


def _excluded(path: str, name: str, root: str, patterns: Sequence[str]) -> bool:
    relative = os.path.relpath(path, root)
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(relative, p) or fnmatch.fnmatch(path, p) for p in patterns)


def _storable(path: str) -> bool:
    try:
        path.encode("utf-8")
        return True
    except UnicodeEncodeError:  # undecodable bytes in a file name (surrogate escapes)
        return False


def iter_files(root: str, options: WalkOptions, problems: list[tuple[str, str]]) -> Iterator[FoundFile]:
    """Yield image files under `root` (a file or a folder), depth first, in sorted name order."""
    if os.path.isfile(root):
        try:
            stat = os.stat(root)
        except OSError as exc:
            problems.append((root, f"cannot stat: {exc.strerror or exc}"))
            return
        if not _storable(root):
            problems.append((root.encode("utf-8", "replace").decode(), "file name is not valid UTF-8"))
            return
        yield FoundFile(root, stat.st_size, stat.st_mtime_ns)
        return
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            problems.append((folder.encode("utf-8", "replace").decode(), f"cannot read folder: {exc.strerror or exc}"))
            continue
        subfolders = []
        for entry in entries:
            name = entry.name
            hidden = name.startswith(".")
            try:
                is_dir = entry.is_dir(follow_symlinks=options.follow_symlinks)
                is_file = not is_dir and entry.is_file()
            except OSError:
                continue
            if is_dir:
                if (hidden and not options.include_hidden) or (name in SKIPPED_DIR_NAMES and not options.include_hidden):
                    continue
                if options.exclude and _excluded(entry.path, name, root, options.exclude):
                    continue
                subfolders.append(entry.path)
            elif is_file:
                if hidden and not options.include_hidden:
                    continue
                if os.path.splitext(name)[1].lower() not in options.suffixes:
                    continue
                if options.exclude and _excluded(entry.path, name, root, options.exclude):
                    continue
                if not _storable(entry.path):
                    problems.append((entry.path.encode("utf-8", "replace").decode(), "file name is not valid UTF-8"))
                    continue
                try:
                    stat = entry.stat()
                except OSError as exc:
                    problems.append((entry.path, f"cannot stat: {exc.strerror or exc}"))
                    continue
                yield FoundFile(entry.path, stat.st_size, stat.st_mtime_ns)
        stack.extend(reversed(subfolders))


def walk(roots: Sequence[str | Path], options: WalkOptions = WalkOptions()) -> WalkResult:
    """Collect image files under every root; roots are made absolute (symlinks in them kept, not resolved)."""
    result = WalkResult()
    seen: set[str] = set()
    for raw in roots:
        root = os.path.abspath(os.fspath(raw))
        if not os.path.exists(root):
            result.problems.append((root, "no such file or folder"))
            continue
        result.roots.append(root)
        for found in iter_files(root, options, result.problems):
            if found.path not in seen:
                seen.add(found.path)
                result.files.append(found)
    return result
