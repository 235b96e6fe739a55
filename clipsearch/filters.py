"""Search filters: folder, capture date, orientation and minimum size, parsed once into a typed `SearchFilter`
and turned into one SQL condition over the `images` table.

The searcher selects the ids that pass (`SearchFilter.sql`) and hands them to FAISS as an allow-list, so a
filtered query ranks only the images that pass: it returns k hits whenever at least k images match (see
`VectorIndex.search`). Meanings, shared by the CLI, the REST API, clip-back and the page:

- `in` FOLDER (repeatable): the image's path is the folder or inside it (any depth). The CLI reads a relative
  folder against the current directory; REST clients give absolute paths (as result paths are shown).
- `after` / `before` DATE: the image's date is at or after `after` (inclusive) and before `before` (exclusive).
  The date is the EXIF capture time (`taken_at`) when the file has one, else the file's modification time.
  Both are wall-clock times: EXIF times are the camera's local time with no zone, so a date or a datetime
  without a UTC offset is read as local time of the machine that searches, and one with an offset
  ("2024-05-01T10:00+02:00", "...Z") is converted to that local time first. Accepted: 2024, 2024-05,
  2024-05-01, 2024-05-01T14:30[:15[.123]] (a space instead of T too), with an optional offset.
- `orientation` landscape | portrait | square: square means the sides differ by at most 1% of the longer one
  (a 1010x1000 scan is square, 1011x1000 is landscape), so the three kinds split every image with known size.
- `min_size` WxH: width >= W and height >= H (displayed size, after EXIF rotation), e.g. 1920x1080.

Images without a known size match no orientation and no minimum size.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from .errors import QueryError
from .text import is_utf8

ORIENTATIONS = ("landscape", "portrait", "square")
SQUARE_TOLERANCE_PERCENT = 1
MAX_FOLDERS = 64
MAX_SIDE = 1_000_000
DATE_HELP = ("Write a date as 2024-05-01 (or 2024-05, 2024), or a date and time as 2024-05-01T14:30 "
             "(optionally with a UTC offset, e.g. 2024-05-01T14:30+02:00).")
_SIZE_RE = re.compile(r"^\s*(\d{1,7})\s*[xX×]\s*(\d{1,7})\s*$")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_NS_MIN, _NS_MAX = -(2**63), 2**63 - 1


class FilterError(QueryError):
    """A filter value that cannot be read (a bad date, size or orientation, a relative folder over REST)."""


@dataclass(frozen=True)
class DateBound:
    """One end of a date range: as the user wrote it, as local wall-clock ISO text (compared with `taken_at`)
    and as nanoseconds since the epoch (compared with `mtime_ns`)."""

    text: str
    local_iso: str
    epoch_ns: int


@dataclass(frozen=True)
class EmptyReason:
    """Why a search found nothing: the collection holds no image, or its filters themselves match none."""

    message: str
    hint: str | None = None


@dataclass(frozen=True)
class SearchFilter:
    """Which images a search may return; the empty filter (the default) lets every image through."""

    folders: tuple[str, ...] = ()
    after: DateBound | None = None
    before: DateBound | None = None
    orientation: str | None = None
    min_width: int | None = None
    min_height: int | None = None

    @classmethod
    def parse(cls, folders: tuple[str, ...] | list[str] | str | None = None, after: str | None = None,
              before: str | None = None, orientation: str | None = None, min_size: str | None = None,
              base: str | None = None) -> "SearchFilter":
        """Read filter values as the user gave them (empty strings and None mean "no filter"). `base`: the
        folder a relative `folders` entry is read against (the CLI's current directory); None refuses relative
        folders (the REST API). FilterError (a QueryError: CLI exit 1, HTTP 400) on a bad value."""
        after_bound = parse_date(after, "after") if _given(after) else None
        before_bound = parse_date(before, "before") if _given(before) else None
        if after_bound and before_bound and after_bound.epoch_ns >= before_bound.epoch_ns:
            raise FilterError(f"the date range is empty: after {after_bound.text} (inclusive) and before "
                              f"{before_bound.text} (exclusive)",
                              "'after' is the first moment included and 'before' the first one left out: give an "
                              "'after' earlier than 'before'.")
        width = height = None
        if _given(min_size):
            width, height = parse_min_size(str(min_size))
        return cls(folders=parse_folders(folders, base), after=after_bound, before=before_bound,
                   orientation=parse_orientation(orientation) if _given(orientation) else None,
                   min_width=width, min_height=height)

    @property
    def active(self) -> bool:
        return bool(self.folders or self.after or self.before or self.orientation or self.min_width)

    @property
    def uses_date(self) -> bool:
        return self.after is not None or self.before is not None

    def sql(self) -> tuple[str, list]:
        """A condition over the `images` table and its parameters ("1" for the empty filter)."""
        parts = [part for part in (self.folder_sql(), self.date_sql(), self.shape_sql()) if part[0]]
        if not parts:
            return "1", []
        return " AND ".join(f"({where})" for where, _ in parts), [p for _, params in parts for p in params]

    def folder_sql(self, folders: tuple[str, ...] | None = None) -> tuple[str, list]:
        folders = self.folders if folders is None else folders
        if not folders:
            return "", []
        clauses: list[str] = []
        params: list = []
        for folder in folders:
            if not is_utf8(folder):  # stored paths are UTF-8 text: such a folder holds none of them
                clauses.append("0")
                continue
            prefix = folder.rstrip("/\\") + os.sep
            clauses.append("path = ? OR substr(path, 1, ?) = ?")
            params += [folder, len(prefix), prefix]
        return " OR ".join(f"({c})" for c in clauses), params

    def date_sql(self) -> tuple[str, list]:
        # The image's date: taken_at (local ISO text, compared as text) when it has one, else mtime_ns.
        clauses: list[str] = []
        params: list = []
        for bound, op in ((self.after, ">="), (self.before, "<")):
            if bound is not None:
                clauses.append(f"CASE WHEN coalesce(taken_at, '') != '' THEN taken_at {op} ? ELSE mtime_ns {op} ? END")
                params += [bound.local_iso, bound.epoch_ns]
        return " AND ".join(clauses), params

    def shape_sql(self) -> tuple[str, list]:
        clauses: list[str] = []
        params: list = []
        tolerance = 100 // SQUARE_TOLERANCE_PERCENT
        if self.orientation == "square":
            clauses.append(f"width > 0 AND height > 0 AND abs(width - height) * {tolerance} <= max(width, height)")
        elif self.orientation == "landscape":
            clauses.append(f"width > 0 AND height > 0 AND (width - height) * {tolerance} > width")
        elif self.orientation == "portrait":
            clauses.append(f"width > 0 AND height > 0 AND (height - width) * {tolerance} > height")
        if self.min_width is not None:
            clauses.append("width >= ? AND height >= ?")
            params += [self.min_width, self.min_height]
        return " AND ".join(clauses), params

    def describe(self) -> str:
        """The filters as understood, e.g. 'in /photos/2024; date (EXIF taken_at, else file mtime) from
        2024-05-01T00:00:00; landscape'."""
        parts: list[str] = []
        if self.folders:
            parts.append("in " + " or ".join(self.folders))
        if self.uses_date:
            span = " ".join(text for text in (
                f"from {self.after.local_iso}" if self.after else "",
                f"before {self.before.local_iso}" if self.before else "") if text)
            parts.append(f"date (EXIF taken_at, else file mtime) {span}")
        if self.orientation:
            parts.append(self.orientation)
        if self.min_width is not None:
            parts.append(f"at least {self.min_width}x{self.min_height} px")
        return "; ".join(parts)


def _given(value: object) -> bool:
    return value is not None and not (isinstance(value, str) and not value.strip())


def parse_folders(folders: tuple[str, ...] | list[str] | str | None, base: str | None) -> tuple[str, ...]:
    if folders is None:
        return ()
    given = [folders] if isinstance(folders, str) else list(folders)
    if len(given) > MAX_FOLDERS:
        raise FilterError(f"{len(given)} folders to search in is more than the limit of {MAX_FOLDERS}")
    found: list[str] = []
    for raw in given:
        folder = os.fspath(raw).strip() if isinstance(raw, (str, os.PathLike)) else None
        if not folder:
            raise FilterError("an empty folder to search in ('in')", "Give a folder that holds indexed photos.")
        if "\x00" in folder:  # no path holds one: it would only ever match nothing
            raise FilterError(f"the folder to search in has a NUL character: {folder[:200]!r}",
                              "Give the folder as result paths show it, e.g. /home/me/Pictures/2024.")
        if not os.path.isabs(folder):
            if base is None:
                raise FilterError(f"the folder to search in must be an absolute path, not {folder[:200]!r}",
                                  "Give the folder as result paths show it, e.g. /home/me/Pictures/2024.")
            folder = os.path.join(base, folder)
        folder = os.path.normpath(folder)
        if folder.startswith("//"):  # POSIX keeps a leading "//" apart; on Linux and macOS it is "/"
            folder = "/" + folder.lstrip("/")
        if folder not in found:
            found.append(folder)
    return tuple(found)


def parse_orientation(value: str) -> str:
    orientation = str(value).strip().lower()
    if orientation not in ORIENTATIONS:
        raise FilterError(f"unknown orientation {str(value)[:40]!r}",
                          "Choose landscape (wider than tall), portrait (taller than wide) or square (sides within "
                          f"{SQUARE_TOLERANCE_PERCENT}% of each other).")
    return orientation


def parse_min_size(value: str) -> tuple[int, int]:
    match = _SIZE_RE.match(value)
    if match is None:
        raise FilterError(f"minimum size {value[:40]!r} is not WIDTHxHEIGHT",
                          "Give whole pixels as WxH, e.g. 1920x1080 (1920x1 for a width alone).")
    width, height = int(match.group(1)), int(match.group(2))
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise FilterError(f"minimum size {value.strip()} is out of range: each side must be 1 to {MAX_SIDE:,} pixels",
                          "Give whole pixels as WxH, e.g. 1920x1080 (1920x1 for a width alone).")
    return width, height


def parse_date(value: str, which: str) -> DateBound:
    """'2024-05-01', '2024-05', '2024', or an ISO datetime (offset optional) -> a DateBound in local time."""
    text = str(value).strip()
    try:
        if re.fullmatch(r"\d{4}", text):
            moment = datetime(int(text), 1, 1)
        elif re.fullmatch(r"\d{4}-\d{2}", text):
            moment = datetime(int(text[:4]), int(text[5:]), 1)
        else:
            moment = datetime.fromisoformat(text)
    except (ValueError, OverflowError) as exc:
        # datetime's own words, except for an offset, where they spell out timedelta reprs
        reason = "its UTC offset is not between -23:59 and +23:59" if "offset" in str(exc) else str(exc)
        raise FilterError(f"{which} date {text[:40]!r} is not a date ({reason})", DATE_HELP) from exc
    if moment.tzinfo is None:
        aware = _local_or_utc(moment)  # naive: local wall-clock time
        local = moment
    else:
        aware = moment
        local = _local_or_utc(moment).replace(tzinfo=None)
    epoch_ns = (aware - _EPOCH) // timedelta(microseconds=1) * 1000
    # SQLite integers are 64-bit: a bound past them (before 1678 or after 2262) is clamped, which selects the very
    # same images, as every stored mtime_ns lies within them.
    epoch_ns = min(max(epoch_ns, _NS_MIN), _NS_MAX)
    return DateBound(text=text, local_iso=local.isoformat(timespec="microseconds" if local.microsecond else "seconds"),
                     epoch_ns=int(epoch_ns))


def _local_or_utc(moment: datetime) -> datetime:
    """`moment` in the local time zone; at the ends of datetime's range (year 1, year 9999), where the local
    conversion overflows and an hour's offset selects nothing different: in UTC, else (when even that leaves the
    range) in its own offset."""
    try:
        return moment.astimezone()
    except (ValueError, OverflowError, OSError):
        pass
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    try:
        return moment.astimezone(timezone.utc)
    except (ValueError, OverflowError):
        return moment


def image_date(taken_at: str | None, mtime_ns: int) -> tuple[str, str]:
    """(the date the date filters compare, which one it is: "taken_at" or "mtime"), as local ISO text."""
    if taken_at:
        return taken_at, "taken_at"
    return datetime.fromtimestamp(mtime_ns / 1e9).isoformat(timespec="seconds"), "mtime"


def empty_reason(store, search_filter: SearchFilter) -> EmptyReason | None:
    """Why no image passes `search_filter` in a `Store` (None when some do): a folder holding no indexed image,
    else how many images pass each part on its own."""
    for folder in search_filter.folders:
        if not store.count_where(*search_filter.folder_sql((folder,))):
            roots = sorted(store.served_roots())
            shown = ", ".join(roots[:5]) + (" …" if len(roots) > 5 else "")
            return EmptyReason(f"no indexed image is in {folder}",
                               f"This collection holds photos from: {shown}." if roots else
                               "Check the folder's spelling, or index it first: clipsearch index FOLDER")
    if store.count_where(*search_filter.sql()):
        return None
    counts = []
    for label, part in (("in the folders", search_filter.folder_sql()), ("in the date range", search_filter.date_sql()),
                        ("of that shape and size", search_filter.shape_sql())):
        if part[0]:
            counts.append(f"{store.count_where(*part):,} {label}")
    return EmptyReason(f"no image passes all the filters ({search_filter.describe()})",
                       "Each on its own: " + ", ".join(counts) + "." if len(counts) > 1 else
                       "Widen the filter.")
