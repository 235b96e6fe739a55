"""A bundle's image side checked against its model.json before its vectors are stored.

A collection is bound to a model id read from model.json (the sha256 it records for visual.onnx), so a bundle whose
visual graph, weights or preprocessing were replaced or damaged after it was made would write another tower's vectors
under the genuine id, mixed with the real ones. The indexer checks those files first. A file's digest is remembered
per user (in `CLIPSEARCH_HOME`), keyed by its path, size, mtime and inode, so a file is hashed once per version (an
88 MB int8 ViT-B-32 weight file takes about 0.14 s here), not on every run.

Each graph is also checked when a session first opens it (`runtime.OnnxSession`): the text side (textual graph,
weights, tokenizer) before the first query vector, an ITM head before the first re-ranking score. A changed text
tower stores nothing, but would rank every query by another model's vectors.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from ..errors import BundleError
from .bundle import BundleInfo, sha256_file

IMAGE_SIDE_FILES = ("visual.onnx", "visual.onnx.data", "preprocess.json")
TEXT_SIDE_FILES = ("textual.onnx", "textual.onnx.data", "tokenizer.json")
CACHE_FILE = "verified-files.json"
MAX_REMEMBERED = 256  # files; the oldest entries go first


def check_image_side(info: BundleInfo, cache: Path | None = None, verified: dict | None = None) -> None:
    """BundleError unless every file that decides an image's vector matches the sha256 model.json records for it
    (files model.json records nothing for, as in bundles older than their checksums, are not checked). `cache`: the
    remembered digests (default: `verified-files.json` in `paths.home()`); `verified`: what this process found
    matching already (path -> [size, mtime_ns, inode, digest], filled here), so that checking again costs a stat."""
    check_files(info, IMAGE_SIDE_FILES, "vectors", cache, verified)


def check_text_side(info: BundleInfo, cache: Path | None = None, verified: dict | None = None) -> None:
    """As `check_image_side`, for the files that decide a query's vector."""
    check_files(info, TEXT_SIDE_FILES, "query vectors", cache, verified)


def check_files(info: BundleInfo, names: tuple[str, ...], output: str, cache: Path | None = None,
                verified: dict | None = None) -> None:
    """BundleError unless each of `names` matches the sha256 model.json records for it; `output` names what a
    changed file would make wrong ("vectors", "re-ranking scores")."""
    stamps = {}
    for name in names:
        if info.files.get(name) is not None:
            try:
                stat = os.stat(info.file(name))
                stamps[name] = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
            except OSError:
                stamps[name] = None
    if verified is not None and all(stamp is not None and verified.get(os.path.realpath(info.file(name)), [])[:3]
                                    == stamp for name, stamp in stamps.items()):
        return  # every file as this process found it matching: nothing changed
    if cache is None:
        from ..paths import home

        cache = home() / CACHE_FILE
    remembered = _load(cache)
    changed = False
    differing = []
    for name, stamp in stamps.items():
        expected = info.files[name]
        path = info.file(name)
        if stamp is None:
            differing.append(f"{name} (missing)")
            continue
        key = os.path.realpath(path)
        entry = remembered.get(key)
        if isinstance(entry, list) and entry[:3] == stamp and len(entry) == 4:
            digest = entry[3]
        else:
            digest = sha256_file(path)
            remembered.pop(key, None)
            remembered[key] = [*stamp, digest]  # newest last
            changed = True
        if digest != expected:
            differing.append(name)
        elif verified is not None:
            verified[key] = [*stamp, digest]
    if changed:
        _save(cache, remembered)
    if differing:
        raise BundleError(
            f"model {info.name}: {', '.join(differing)} {'does' if len(differing) == 1 else 'do'} not match the "
            "sha256 its model.json records, so its "
            f"{output} would not be the model's (the bundle was changed after it was made)",
            f"Export or download the bundle again; `clipsearch models info {info.path} --verify` lists what differs.")


def _load(cache: Path) -> dict:
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save(cache: Path, remembered: dict) -> None:
    """Write atomically (a temporary file renamed over it); a cache that cannot be written is only a cost."""
    entries = list(remembered.items())[-MAX_REMEMBERED:]
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.{threading.get_ident()}.tmp")  # a server checks in threads
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(dict(entries)), encoding="utf-8")
        os.replace(tmp, cache)
    except OSError:
        try:
            tmp.unlink()
        except OSError:
            pass
