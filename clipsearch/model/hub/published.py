"""A clipsearch bundle published on the Hub (model.json and its files at the repo root or in a subfolder):
checked against its own model.json's sha256s, then placed in the model cache with its provenance added."""

from __future__ import annotations

import json
import os
import posixpath
import shutil
from pathlib import Path
from typing import Any

from ...errors import BundleError
from ..bundle import (BUNDLE_FILES, ITM_FILES, WEIGHT_FILES, linked_files, read_bundle, sha256_file, staged_folder,
                      verify_bundle, write_model_json)
from .spec import HubRef


def bundle_files(ref: HubRef, snapshot: Path) -> list[str]:
    """Repository paths of the bundle's files (its own, and those shared with sibling bundles via "links")."""
    folder = snapshot / ref.subfolder if ref.subfolder else snapshot
    try:
        raw = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"{ref.spec}: cannot read model.json: {exc}") from exc
    links = linked_files(folder, raw.get("links"))
    paths = []
    for name in BUNDLE_FILES + WEIGHT_FILES + ITM_FILES:
        local = links.get(name, name)
        path = posixpath.normpath(ref.in_repo(local))
        if path.startswith("../"):
            raise BundleError(f"{ref.spec}: link {name} -> {local} leaves the repository")
        paths.append(path)
    return paths


def required_files(ref: HubRef, snapshot: Path) -> list[str]:
    optional = {ref.in_repo(n) for n in WEIGHT_FILES + ITM_FILES}
    folder = snapshot / ref.subfolder if ref.subfolder else snapshot
    raw = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    hashed = set(raw.get("files") or {})
    return [p for p in bundle_files(ref, snapshot)
            if p not in optional or posixpath.basename(p) in hashed]


def sha256_of(path: Path) -> str:
    return sha256_file(path)


def _place(source: Path, target: Path) -> None:
    """A hard link to the Hub cache's blob when possible (no second copy on disk), a copy otherwise."""
    try:
        os.link(os.path.realpath(source), target)
    except OSError:
        shutil.copyfile(source, target)


def place(ref: HubRef, snapshot: Path, target: Path, provenance: dict[str, Any]) -> Path:
    folder = snapshot / ref.subfolder if ref.subfolder else snapshot
    published = read_bundle(folder)
    problems = verify_bundle(published)
    if problems:
        raise BundleError(f"{ref.spec}: the downloaded files do not match its model.json: {'; '.join(problems)}",
                          f"Download again: clipsearch models pull {ref.spec}")
    with staged_folder(target) as staging:
        for name in BUNDLE_FILES + WEIGHT_FILES + ITM_FILES:
            source = published.file(name)
            if name != "model.json" and source.is_file():
                _place(source, staging / name)
        meta = json.loads((folder / "model.json").read_text(encoding="utf-8"))
        meta.pop("links", None)  # the shared files now sit in this folder
        meta.setdefault("license", provenance.get("license"))
        meta["hub"] = provenance
        written = write_model_json(staging, meta)
        if written["files"] != {k: v for k, v in published.files.items() if k in written["files"]}:
            raise BundleError(f"{ref.spec}: files changed while they were copied into the model cache")
    return target
