"""Finding image files: a recursive walk that skips hidden and tool folders, honours --exclude globs,
and reports (instead of raising on) folders it cannot read, names SQLite cannot store, and entries with an
image suffix that are not regular files (FIFOs, sockets, devices), dangling symlinks and symlink loops.
Nothing here ever opens a file: entries are classified by stat alone."""

from __future__ import annotations

import errno
import fnmatch
import os
import stat as stat_module
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from clipsearch.model.preprocess import IMAGE_SUFFIXES, not_regular_reason
from clipsearch.text import is_utf8

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


def _stat_problem(path: str, exc: OSError) -> str:
    if exc.errno == errno.ENOENT and os.path.islink(path):
        return "dangling symlink"
    if exc.errno == errno.ELOOP:
        return "symlink loop"
    return f"cannot stat: {exc.strerror or exc}"


def _printable(path: str) -> str:
    return path.encode("utf-8", "replace").decode() if not is_utf8(path) else path


def iter_files(root: str, options: WalkOptions, problems: list[tuple[str, str]]) -> Iterator[FoundFile]:
    """Yield image files under `root` (a file or a folder), depth first, in sorted name order."""
    try:
        root_stat = os.stat(root)
    except OSError as exc:
        problems.append((_printable(root), _stat_problem(root, exc)))
        return
    if not stat_module.S_ISDIR(root_stat.st_mode):
        if not stat_module.S_ISREG(root_stat.st_mode):
            problems.append((_printable(root), not_regular_reason(root_stat.st_mode)))
        elif not is_utf8(root):
            problems.append((_printable(root), "file name is not valid UTF-8"))
        else:
            yield FoundFile(root, root_stat.st_size, root_stat.st_mtime_ns)
        return
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            problems.append((_printable(folder), f"cannot read folder: {exc.strerror or exc}"))
            continue
        subfolders = []
        for entry in entries:
            name = entry.name
            hidden = name.startswith(".")
            try:
                is_dir = entry.is_dir(follow_symlinks=options.follow_symlinks)
            except OSError:
                is_dir = False  # a symlink loop or a vanished entry: classified by the stat below
            if is_dir:
                if (hidden and not options.include_hidden) or (name in SKIPPED_DIR_NAMES and not options.include_hidden):
                    continue
                if options.exclude and _excluded(entry.path, name, root, options.exclude):
                    continue
                subfolders.append(entry.path)
                continue
            if hidden and not options.include_hidden:
                continue
            if os.path.splitext(name)[1].lower() not in options.suffixes:
                continue
            if options.exclude and _excluded(entry.path, name, root, options.exclude):
                continue
            if not is_utf8(entry.path):
                problems.append((_printable(entry.path), "file name is not valid UTF-8"))
                continue
            try:
                stat = entry.stat()  # follows a symlink to its target
            except OSError as exc:
                problems.append((entry.path, _stat_problem(entry.path, exc)))
                continue
            if stat_module.S_ISDIR(stat.st_mode):
                continue  # a symlink to a folder that happens to be named like an image; not followed
            if not stat_module.S_ISREG(stat.st_mode):
                problems.append((entry.path, not_regular_reason(stat.st_mode)))
                continue
            yield FoundFile(entry.path, stat.st_size, stat.st_mtime_ns)
        stack.extend(reversed(subfolders))


def walk(roots: Sequence[str | Path], options: WalkOptions = WalkOptions()) -> WalkResult:
    """Collect image files under every root; roots are made absolute (symlinks in them kept, not resolved)."""
    result = WalkResult()
    seen: set[str] = set()
    for raw in roots:
        root = os.path.abspath(os.fspath(raw))
        if not os.path.lexists(root):
            result.problems.append((root, "no such file or folder"))
            continue
        if not os.path.exists(root):  # a dangling symlink or a symlink loop: nothing under it to sweep
            try:
                os.stat(root)
            except OSError as exc:
                result.problems.append((root, _stat_problem(root, exc)))
            continue
        result.roots.append(root)
        for found in iter_files(root, options, result.problems):
            if found.path not in seen:
                seen.add(found.path)
                result.files.append(found)
    return result
