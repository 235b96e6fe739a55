"""Where clipsearch keeps its state, and what an indexed image's stored path names.

`CLIPSEARCH_HOME` relocates everything (collections, model cache), so tests and tools can isolate
themselves; otherwise the per-user platformdirs locations are used.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import platformdirs

APP_NAME = "clipsearch"


def home() -> Path:
    """Root of the per-user data (collections live below it)."""
    override = os.environ.get("CLIPSEARCH_HOME")
    if override:
        return _checked_home(Path(override).expanduser())
    return Path(platformdirs.user_data_dir(APP_NAME))


def _checked_home(folder: Path) -> Path:
    """CLIPSEARCH_HOME as given, unless it names something that cannot hold a folder (a file): then say it is the
    setting that is wrong, rather than an error about a path deep inside it."""
    if folder.exists() and not folder.is_dir():
        from .errors import CollectionError

        raise CollectionError(f"CLIPSEARCH_HOME={folder} is a file, not a folder",
                              "Point CLIPSEARCH_HOME at a folder (it is created when missing), or unset it for the "
                              "per-user default.")
    return folder


def model_cache_dir() -> Path:
    """Folder of exported model bundles, one sub-folder per model name."""
    override = os.environ.get("CLIPSEARCH_HOME")
    if override:
        return _checked_home(Path(override).expanduser()) / "models"
    return Path(platformdirs.user_cache_dir(APP_NAME)) / "models"


def collections_dir() -> Path:
    return home() / "collections"


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (best effort: some filesystems refuse to fsync a directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_url_path(path: str) -> bool:
    """True for the stored path of a URL row (local paths are stored absolute, URLs keep their scheme)."""
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path))


def missing_local_files(paths: list[str]) -> set[str]:
    """The paths among `paths` of local files that are no longer there (moved or deleted since they were indexed;
    the collection learns of it at its next `clipsearch index`). URL rows name no local file and are never missing;
    a file there but not ours to look at (permissions) is not "moved or deleted" either."""

    def gone(path: str) -> bool:
        try:
            os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return True
        except OSError:
            return False
        return False

    return {p for p in paths if not is_url_path(p) and gone(p)}
