"""Finding image files: a recursive walk that skips hidden and tool folders, honours --exclude globs,
and reports (instead of raising on) folders it cannot read, names SQLite cannot store, and entries with an
image suffix that are not regular files (FIFOs, sockets, devices), dangling symlinks and symlink loops.
Nothing here ever opens a file: entries are classified by stat alone.

`walk_changes` walks only the paths a watcher saw change (clipsearch watch), by the same rules as a walk of their
root would reach them."""

from __future__ import annotations

import errno
import fnmatch
import os
import stat as stat_module
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

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
    # Roots given that no longer exist but under which the collection holds images (a deleted folder or file): a
    # run sweeps them like any root, so their images leave the collection (the runner fills this in).
    vanished: list[str] = field(default_factory=list)


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
    """`path` as text that names it: bytes that are not UTF-8 are shown escaped ("bad-\\xff-name.png"), as
    Python shows them, not as "?" (which named no file anyone could find)."""
    if is_utf8(path):
        return path
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _folder_left_out(path: str, name: str, root: str, options: WalkOptions) -> bool:
    """A sub-folder a walk of `root` does not enter: hidden, a tool folder, or excluded."""
    if (name.startswith(".") or name in SKIPPED_DIR_NAMES) and not options.include_hidden:
        return True
    return bool(options.exclude) and _excluded(path, name, root, options.exclude)


def _file_left_out(path: str, name: str, root: str, options: WalkOptions) -> bool:
    """A file a walk of `root` does not consider: hidden, not named like an image, or excluded."""
    if name.startswith(".") and not options.include_hidden:
        return True
    if os.path.splitext(name)[1].lower() not in options.suffixes:
        return True
    return bool(options.exclude) and _excluded(path, name, root, options.exclude)


def _image_file(path: str, problems: list[tuple[str, str]]) -> FoundFile | None:
    """A path that passed the name rules, classified by stat: the image file, or None (a problem was recorded,
    or it is a symlink to a folder, which is not followed)."""
    if not is_utf8(path):
        problems.append((_printable(path), "file name is not valid UTF-8"))
        return None
    try:
        stat = os.stat(path)  # follows a symlink to its target
    except OSError as exc:
        problems.append((path, _stat_problem(path, exc)))
        return None
    if stat_module.S_ISDIR(stat.st_mode):
        return None  # a symlink to a folder that happens to be named like an image; not followed
    if not stat_module.S_ISREG(stat.st_mode):
        problems.append((path, not_regular_reason(stat.st_mode)))
        return None
    return FoundFile(path, stat.st_size, stat.st_mtime_ns)


def iter_files(root: str, options: WalkOptions, problems: list[tuple[str, str]],
               base: str | None = None) -> Iterator[FoundFile]:
    """Yield image files under `root` (a file or a folder), depth first, in sorted name order. `base`: the
    folder --exclude patterns are relative to when `root` is a folder inside the one being indexed."""
    base = root if base is None else base
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
            try:
                is_dir = entry.is_dir(follow_symlinks=options.follow_symlinks)
            except OSError:
                is_dir = False  # a symlink loop or a vanished entry: classified by the stat below
            if is_dir:
                if not _folder_left_out(entry.path, name, base, options):
                    subfolders.append(entry.path)
                continue
            if _file_left_out(entry.path, name, base, options):
                continue
            found = _image_file(entry.path, problems)
            if found is not None:
                yield found
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


def inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _reached_from(root: str, path: str, options: WalkOptions) -> bool:
    """Whether a walk of the folder `root` enters every folder between it and `path` (by name alone)."""
    parts = os.path.relpath(path, root).split(os.sep)[:-1]
    folder = root
    for name in parts:
        folder = os.path.join(folder, name)
        if _folder_left_out(folder, name, root, options):
            return False
    return True


def might_hold_images(root: str, path: str, is_folder: bool, options: WalkOptions = WalkOptions()) -> bool:
    """Whether a walk of the folder `root` reaches `path`, by name alone (nothing is read, so it also answers for a
    path that is gone): a folder it enters, or a file it considers. False for a path outside `root`."""
    if not inside(path, root):
        return False
    if path == root:
        return True
    if not _reached_from(root, path, options):
        return False
    left_out = _folder_left_out if is_folder else _file_left_out
    return not left_out(path, os.path.basename(path), root, options)


def walk_changes(changes: Sequence[tuple[str, str]], options: WalkOptions = WalkOptions()) -> WalkResult:
    """The image files at or under changed paths, found by the rules a walk of their root follows; `changes`
    holds (root, changed path) pairs, both absolute, the path inside its root (a pair outside is left out).

    `roots` of the result are the changed paths themselves, whether or not they still exist: an indexing run
    over it sweeps whatever the index holds under them that was not found (deleted, renamed away, now
    excluded), and leaves the rest of the collection alone. A path that no longer exists is no problem, except
    a root itself: as in `walk`, a root that is gone is reported, and what the index holds under it is kept."""
    result = WalkResult()
    seen: set[str] = set()
    scoped: set[str] = set()
    for root, path in changes:
        if not inside(path, root) or path in scoped:
            continue
        scoped.add(path)
        if path == root:  # exactly as `walk`: a root that is gone (an unmounted disk?) is reported, not swept
            whole = walk([root], options)
            result.roots.extend(whole.roots)
            result.problems.extend(whole.problems)
            found_files: Iterable[FoundFile] = whole.files
        else:
            result.roots.append(path)
            found_files = _files_at(root, path, options, result.problems)
        for found in found_files:
            if found.path not in seen:
                seen.add(found.path)
                result.files.append(found)
    return result


def _files_at(root: str, path: str, options: WalkOptions, problems: list[tuple[str, str]]) -> Iterable[FoundFile]:
    """The image files a walk of the folder `root` finds at or under `path` (a file or folder inside it)."""
    if not os.path.lexists(path) or not os.path.isdir(root) or not _reached_from(root, path, options):
        return ()
    name = os.path.basename(path)
    if os.path.isdir(path) and not os.path.islink(path):
        return () if _folder_left_out(path, name, root, options) else iter_files(path, options, problems, base=root)
    if _file_left_out(path, name, root, options):
        return ()
    found = _image_file(path, problems)
    return () if found is None else (found,)
