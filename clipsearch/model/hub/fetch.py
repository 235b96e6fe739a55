"""The huggingface_hub calls: downloads into its cache, settings read from the environment at call time, and
each failure turned into one ModelNotAvailable that names the model and the fix."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ...errors import ModelNotAvailable
from .spec import HubRef

OFFLINE_FALLBACK = "or use the bundled offline model: --model emoji-mini"


def _true(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def offline() -> bool:
    """HF_HUB_OFFLINE or CLIPSEARCH_OFFLINE, read now (huggingface_hub reads its own once, at import)."""
    if _true(os.environ.get("HF_HUB_OFFLINE")) or _true(os.environ.get("CLIPSEARCH_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> Path:
    """huggingface_hub's cache folder as the environment says now (HF_HUB_CACHE, else HF_HOME/hub)."""
    env = os.environ
    explicit = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def not_available(ref: HubRef, cause: str) -> ModelNotAvailable:
    """The one message for a Hub model that is neither cached nor downloadable."""
    return ModelNotAvailable(
        f"model {ref.spec} is not cached and cannot be downloaded: {cause}",
        f"Fix: connect to the internet and run `clipsearch models pull {ref.spec}` (with HF_HUB_OFFLINE and "
        f"CLIPSEARCH_OFFLINE unset; HF_ENDPOINT selects a mirror), {OFFLINE_FALLBACK}")


def download(ref: HubRef, patterns: Sequence[str], revision: str | None = None) -> Path:
    """Fetch the files matching `patterns` (fnmatch, repository paths) at `revision` (default: the ref's) and
    return the snapshot folder (…/snapshots/<commit>). Offline, the cached snapshot is returned as it is:
    callers check that the files they need are in it."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub import errors as hub_errors
    except ImportError as exc:
        raise ModelNotAvailable(f"downloading {ref.spec} needs huggingface_hub, which is not installed",
                                f"Install it with `pip install huggingface_hub` (no torch needed), {OFFLINE_FALLBACK}") from exc
    local_only = offline()
    try:
        folder = snapshot_download(
            ref.repo_id, revision=revision or ref.revision, cache_dir=str(hub_cache_dir()),
            allow_patterns=list(patterns), local_files_only=local_only, endpoint=os.environ.get("HF_ENDPOINT") or None)
    except hub_errors.GatedRepoError as exc:
        raise ModelNotAvailable(f"{ref.spec} is a gated repository: its files need an accepted licence and a token",
                                "Accept the terms on the repository's page and log in with `hf auth login`") from exc
    except hub_errors.RepositoryNotFoundError as exc:
        raise ModelNotAvailable(f"no repository {ref.repo_id} on {hub_endpoint()} (or it is private)",
                                "Check the spelling (hf:ORG/REPO), or log in with `hf auth login` for a private one") from exc
    except hub_errors.RevisionNotFoundError as exc:
        raise ModelNotAvailable(f"{ref.repo_id} has no revision '{ref.revision}'",
                                f"Use a branch, tag or commit of the repository, or leave it out: hf:{ref.repo_id}") from exc
    except hub_errors.LocalEntryNotFoundError as exc:
        cause = ("offline mode is on (HF_HUB_OFFLINE or CLIPSEARCH_OFFLINE)" if local_only
                 else f"{hub_endpoint()} is unreachable (offline?)")
        raise not_available(ref, cause) from exc
    except hub_errors.HfHubHTTPError as exc:
        raise ModelNotAvailable(f"downloading {ref.spec} failed: {exc}",
                                f"Try again later (downloads resume), {OFFLINE_FALLBACK}") from exc
    except OSError as exc:  # disk full, permissions on the cache folder
        raise ModelNotAvailable(f"downloading {ref.spec} into {hub_cache_dir()} failed: {exc}") from exc
    return Path(folder)


def missing_files(snapshot: Path, paths: Sequence[str]) -> list[str]:
    return [p for p in paths if not (snapshot / p).is_file()]


def require_files(ref: HubRef, snapshot: Path, paths: Sequence[str]) -> None:
    """ModelNotAvailable when a needed file is not in the (possibly partial, offline) snapshot."""
    missing = missing_files(snapshot, paths)
    if missing:
        cause = (f"the cached copy lacks {', '.join(missing)}" if offline()
                 else f"the repository has no {', '.join(missing)}")
        if offline():
            raise not_available(ref, cause)
        raise ModelNotAvailable(f"{ref.spec} is incomplete: {cause}")


def card_license(snapshot: Path) -> str | None:
    """The licence the repository card (README.md front matter) states, or None."""
    readme = snapshot / "README.md"
    if not readme.is_file():
        return None
    try:
        from huggingface_hub.repocard import metadata_load

        meta = metadata_load(readme) or {}
    except Exception:  # noqa: BLE001 - a malformed card only costs the licence line
        return None
    value = meta.get("license")
    if isinstance(value, list):
        value = ", ".join(str(v) for v in value)
    if value and str(value) == "other" and meta.get("license_name"):
        value = f"other ({meta['license_name']})"
    return str(value) if value else None
