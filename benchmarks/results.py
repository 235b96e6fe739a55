"""Write one benchmark's section of benchmarks/RESULTS.md, replacing that section's previous text only.

Each section is fenced by HTML comments so that benchmarks can rerun independently:
    <!-- begin: TITLE --> ... <!-- end: TITLE -->
"""

from __future__ import annotations

import datetime as dt
import platform
import re
from pathlib import Path

HEADER = "# Benchmark results\n\nEvery figure below was produced by the command shown with it, on the machine described.\n"


def write_section(path: Path, title: str, command: str, body: str) -> None:
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else HEADER
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = (f"<!-- begin: {title} -->\n## {title}\n\nCommand: `{command}`  \nMeasured {stamp} on "
               f"{platform.node() or 'this machine'} ({platform.machine()}, {_cores()} cores).\n\n{body.rstrip()}\n"
               f"<!-- end: {title} -->\n")
    pattern = re.compile(rf"<!-- begin: {re.escape(title)} -->.*?<!-- end: {re.escape(title)} -->\n?", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    path.write_text(text, encoding="utf-8")


def _cores() -> int:
    import os

    return os.cpu_count() or 1
