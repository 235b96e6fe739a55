"""`hf:` specs end to end: which kind of repository, what to download, where the bundle goes in the cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...errors import BundleError, ModelNotAvailable
from ...paths import model_cache_dir
from ..bundle import is_bundle, recover_staged
from . import immich, published
from .fetch import card_license, download, hub_endpoint, offline, require_files
from .spec import HubRef, parse_hub_spec

# First look: enough to tell a clipsearch bundle from an Immich export (and to find a bundle in a subfolder).
_PROBE = ("model.json", "config.json", "README.md")


def cache_folder(ref: HubRef) -> Path:
    return model_cache_dir() / ref.cache_name


def resolve_hub(spec: str, fetch: bool = True) -> Path:
    """The cached bundle of `spec` (no network once pulled), pulling it first when `fetch`."""
    ref = parse_hub_spec(spec)
    folder = cache_folder(ref)
    if not folder.exists():
        try:
            recover_staged(folder)
        except OSError:
            pass
    if is_bundle(folder):
        return folder
    if not fetch:
        raise ModelNotAvailable(f"model {ref.spec} has not been pulled into {model_cache_dir()}",
                                f"Run `clipsearch models pull {ref.spec}` (online once)")
    return pull(ref)


def _detect(ref: HubRef) -> tuple[HubRef, Path, str]:
    """(ref with its subfolder settled, snapshot, "bundle" | "immich")."""
    patterns = [ref.in_repo(p) for p in _PROBE] + ["README.md"]
    if not ref.subfolder:
        patterns.append("*/model.json")
    snapshot = download(ref, patterns)
    root = snapshot / ref.subfolder if ref.subfolder else snapshot
    if (root / "model.json").is_file():
        return ref, snapshot, "bundle"
    if immich.is_immich_layout(root):
        return ref, snapshot, "immich"
    nested = sorted(str(p.parent.relative_to(snapshot).as_posix()) for p in root.rglob("model.json"))
    if not ref.subfolder and len(nested) == 1:
        return HubRef(ref.repo_id, nested[0], ref.revision), snapshot, "bundle"
    if nested:
        choices = ", ".join(f"hf:{ref.repo_id}/{n}" for n in nested)
        raise BundleError(f"{ref.spec} holds several bundles", f"Name one: {choices}")
    if offline() and not any((root / p).is_file() for p in _PROBE):
        from .fetch import not_available

        raise not_available(ref, "offline mode is on (HF_HUB_OFFLINE or CLIPSEARCH_OFFLINE) and the cache has no copy")
    raise BundleError(f"{ref.spec} is neither a clipsearch bundle (model.json) nor an Immich CLIP export "
                      "(config.json, visual/model.onnx, textual/model.onnx)",
                      "Use a repository of one of those layouts, or export an open_clip model: --model ARCH/TAG")


def _provenance(ref: HubRef, snapshot: Path, layout: str, files: dict[str, str]) -> dict[str, Any]:
    return {"spec": ref.spec, "repo": ref.repo_id, "subfolder": ref.subfolder or None,
            "revision": ref.revision or "main", "commit": snapshot.name, "endpoint": hub_endpoint(),
            "layout": layout, "license": card_license(snapshot), "files": files}


def pull(ref: HubRef | str, precision: str = "int8") -> Path:
    """Download (or, offline, take from the Hub cache) and place the bundle in the model cache; a bundle already
    built from the same commit (and, for an Immich export, at the same `precision`: int8 by default, like
    `models export`) is kept as it is. A published clipsearch bundle keeps the precision it was published in."""
    ref = parse_hub_spec(ref) if isinstance(ref, str) else ref
    target = cache_folder(ref)
    ref_found, snapshot, layout = _detect(ref)
    commit = snapshot.name
    revision = None if offline() else commit  # online: the files of the commit just resolved, not a newer one
    if layout == "bundle":
        needed = published.required_files(ref_found, snapshot)
        snapshot = download(ref_found, [*needed, "README.md"], revision)
        require_files(ref_found, snapshot, needed)
    else:
        snapshot = download(ref_found, immich.PATTERNS, revision)
        require_files(ref_found, snapshot, immich.REQUIRED)
    if _built_from(target, commit, ref_found, None if layout == "bundle" else precision):
        return target
    root = snapshot / ref_found.subfolder if ref_found.subfolder else snapshot
    if layout == "bundle":
        files = {p: published.sha256_of(snapshot / p) for p in published.bundle_files(ref_found, snapshot)
                 if (snapshot / p).is_file()}
        return published.place(ref_found, snapshot, target, _provenance(ref_found, snapshot, layout, files))
    provenance = _provenance(ref_found, snapshot, layout, immich.source_checksums(root))
    return immich.convert(ref_found, root, target, {**provenance, "precision": precision}, precision)


def _built_from(target: Path, commit: str, ref: HubRef, precision: str | None) -> bool:
    try:
        hub = json.loads((target / "model.json").read_text(encoding="utf-8")).get("hub") or {}
    except (OSError, ValueError):
        return False
    same_precision = precision is None or hub.get("precision", "fp32") == precision  # older pulls: fp32
    return (hub.get("commit") == commit and (hub.get("subfolder") or "") == ref.subfolder and same_precision
            and is_bundle(target))

