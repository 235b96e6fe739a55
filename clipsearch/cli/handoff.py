"""Gather search results into a folder: `clipsearch search --copy-to DIR` / `--link-to DIR`.

Each result becomes ``<rank>-<file name>`` in DIR, the rank zero-padded to at least two digits (``01-beach.jpg``,
``02-dog.png``; three digits from 100 results on) so a file browser sorted by name shows the search order.
Nothing is ever overwritten: if that name is taken (a second run into the same folder) the next free
``01-beach (2).jpg``, ``01-beach (3).jpg`` ... is used, created exclusively (O_EXCL / symlink), so concurrent runs
cannot clobber each other either. Copies keep the file's times (like ``cp -p``); links are symbolic with the
source's absolute path as their target. A result whose file is gone or unreadable is reported and skipped.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from ..errors import ClipsearchError
from ..paths import is_url_path

Mode = Literal["copy", "link"]
_MAX_TRIES = 10_000


class HandoffError(ClipsearchError):
    """The destination folder cannot be used, or no result could be gathered into it."""


@dataclass(frozen=True)
class Gathered:
    rank: int
    source: str
    target: str


@dataclass(frozen=True)
class Skipped:
    rank: int
    source: str
    reason: str


@dataclass
class HandoffReport:
    folder: str
    mode: Mode
    gathered: list[Gathered] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def targets(self) -> dict[int, str]:
        """Where each gathered result went, by rank."""
        return {g.rank: g.target for g in self.gathered}


def check_folder(folder: str | os.PathLike[str], option: str = "--copy-to") -> Path:
    """`folder` as an absolute Path if it is, or can become, a folder; HandoffError otherwise. Creates nothing."""
    path = Path(os.path.abspath(os.path.expanduser(os.fspath(folder))))
    if path.is_symlink() and not path.exists():
        raise HandoffError(f"{option} {folder}: a symbolic link to {os.readlink(path)}, which does not exist",
                           hint=f"give {option} a folder, or create the one the link points to")
    if path.exists() and not path.is_dir():
        raise HandoffError(f"{option} {folder}: exists and is not a folder",
                           hint=f"give {option} a new or existing folder (results are added to it, never overwritten)")
    probe = path
    while not probe.exists():  # the nearest existing ancestor must be a folder we can write into
        probe = probe.parent
    if not probe.is_dir():
        raise HandoffError(f"{option} {folder}: {probe} is not a folder", hint=f"give {option} a folder path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise HandoffError(f"{option} {folder}: {probe} is not writable",
                           hint=f"give {option} a folder you can write to")
    return path


NAME_MAX = 255  # bytes in one file name (ext4, XFS, btrfs, APFS)


def target_name(rank: int, total: int, source: str, attempt: int = 1) -> str:
    """``01-name.jpg`` for rank 1 of up to 99 results; ``01-name (2).jpg`` for the second attempt."""
    width = max(2, len(str(total)))
    base = os.path.basename(source.rstrip(os.sep)) or "image"
    stem, ext = os.path.splitext(base)
    suffix = f" ({attempt}){ext}" if attempt > 1 else ext
    prefix = f"{rank:0{width}d}-"
    # A name may take NAME_MAX (255) bytes: a long one is shortened in its stem, never in its extension or suffix.
    room = NAME_MAX - len(os.fsencode(prefix + suffix))
    while len(os.fsencode(stem)) > room and len(stem) > 1:  # whole characters go, never half of one
        stem = stem[:-1]
    return f"{prefix}{stem}{suffix}"


def _copy_exclusive(source: str, target: Path) -> None:
    """Copy `source` to `target`, which must not exist yet (FileExistsError), keeping times and mode."""
    if not os.path.isfile(source):  # checked before opening: a FIFO would block the open
        raise OSError(0, "not a regular file")
    with open(source, "rb") as src:
        try:
            with open(target, "xb") as dst:
                shutil.copyfileobj(src, dst, 1024 * 1024)
        except FileExistsError:
            raise
        except BaseException:
            target.unlink(missing_ok=True)
            raise
    shutil.copystat(source, target)


def _reason(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    return exc.strerror or str(exc)


def gather(sources: Sequence[str], folder: str | os.PathLike[str], mode: Mode,
           option: str | None = None) -> HandoffReport:
    """Copy or symlink `sources` (best first) into `folder` (created if needed) as ``<rank>-<name>``."""
    option = option or ("--copy-to" if mode == "copy" else "--link-to")
    path = check_folder(folder, option)
    made = [p for p in (path, *path.parents) if not p.exists()]  # the folders this call creates, deepest first
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HandoffError(f"{option} {folder}: cannot create the folder ({_reason(exc)})",
                           hint=f"give {option} a folder you can write to") from exc
    report = HandoffReport(folder=str(path), mode=mode)
    total = len(sources)
    for rank, source in enumerate(sources, 1):
        if is_url_path(source):  # an imported row with no local file (clip-retrieval's url column)
            report.skipped.append(Skipped(rank, source, "a URL (an imported row), not a file on this machine"))
            continue
        absolute = os.path.abspath(source)
        if not os.path.exists(absolute):
            report.skipped.append(Skipped(rank, source, "no such file"))
            continue
        for attempt in range(1, _MAX_TRIES + 1):
            target = path / target_name(rank, total, source, attempt)
            try:
                if mode == "link":
                    os.symlink(absolute, target)
                else:
                    _copy_exclusive(absolute, target)
            except FileExistsError:
                continue
            except OSError as exc:
                report.skipped.append(Skipped(rank, source, _reason(exc)))
                break
            report.gathered.append(Gathered(rank, source, str(target)))
            break
        else:
            report.skipped.append(Skipped(rank, source, f"{_MAX_TRIES} names taken in {path}"))
    if not report.gathered:  # nothing to show for it: the folders it made go again
        for created in made:
            try:
                created.rmdir()
            except OSError:  # something else was put there meanwhile
                break
    return report
