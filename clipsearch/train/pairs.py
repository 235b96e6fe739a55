"""Reading a pairs file: one (image path, caption) per row, as CSV (with a header) or JSON Lines.

Accepted column / key names: image | image_path | path | file | filepath for the image, and
caption | text | title | description for the caption. Relative image paths are resolved against the
folder of the pairs file.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ClipsearchError

IMAGE_KEYS = ("image", "image_path", "path", "file", "filepath")
CAPTION_KEYS = ("caption", "text", "title", "description")


class PairsError(ClipsearchError):
    """A pairs file is missing, empty or malformed."""


@dataclass(frozen=True)
class Pair:
    image: Path
    caption: str


def _pick(row: dict, keys: tuple[str, ...], what: str, where: str) -> str:
    lowered = {str(k).strip().lower(): v for k, v in row.items()}
    for key in keys:
        value = lowered.get(key)
        if value is not None and str(value).strip():
            return str(value).strip()
    raise PairsError(f"{where}: no {what} (expected one of the keys {', '.join(keys)})")


def read_pairs(path: Path | str) -> list[Pair]:
    """All pairs of a .csv / .tsv / .jsonl / .json file; raises PairsError on malformed rows."""
    path = Path(path)
    if not path.is_file():
        raise PairsError(f"{path}: no such pairs file")
    base = path.parent
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".ndjson", ".json", ".csv", ".tsv"):
        raise PairsError(f"{path}: unknown pairs format (use .csv, .tsv, .jsonl or .json)")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (Excel's "CSV UTF-8") is not part of the first key
    except UnicodeDecodeError as exc:
        raise PairsError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc
    except OSError as exc:
        raise PairsError(f"{path}: cannot read it ({exc.strerror})") from exc
    rows: list[tuple[str, dict]] = []
    if suffix in (".jsonl", ".ndjson"):
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((f"{path}:{n}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise PairsError(f"{path}:{n}: not JSON ({exc.msg})") from exc
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PairsError(f"{path}: not JSON ({exc.msg}, line {exc.lineno})") from exc
        if not isinstance(data, list):
            raise PairsError(f"{path}: expected a JSON list of objects with image and caption")
        rows = [(f"{path}[{i}]", row) for i, row in enumerate(data)]
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        rows = [(f"{path}:{n}", row) for n, row in enumerate(reader, 2)]
    pairs = []
    for where, row in rows:
        if not isinstance(row, dict):
            raise PairsError(f"{where}: expected an object with image and caption")
        image = Path(_pick(row, IMAGE_KEYS, "image path", where)).expanduser()
        pairs.append(Pair(image if image.is_absolute() else base / image, _pick(row, CAPTION_KEYS, "caption", where)))
    if not pairs:
        raise PairsError(f"{path}: no pairs")
    return pairs
