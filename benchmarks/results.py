"""Write one benchmark's section of benchmarks/RESULTS.md, replacing that section's previous text only.

Each section is fenced by HTML comments so that benchmarks can rerun independently:
    <!-- begin: TITLE --> ... <!-- end: TITLE -->
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

HEADER = "# Benchmark results\n\nEvery figure below was produced by the command shown with it, on the machine described.\n"


def utc_stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def write_section(path: Path, title: str, command: str, body: str, measured: str | None = None) -> None:
    """`measured`: when the figures were taken (default: now; a section rendered later from a saved report passes
    the report's own time)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else HEADER
    stamp = measured or utc_stamp()
    section = (f"<!-- begin: {title} -->\n## {title}\n\nCommand: `{command}`  \nMeasured {stamp} on "
               f"{platform.node() or 'this machine'} ({platform.machine()}, {_cores()} cores{cpu_description()}).\n\n"
               f"{body.rstrip()}\n"
               f"<!-- end: {title} -->\n")
    pattern = re.compile(rf"<!-- begin: {re.escape(title)} -->.*?<!-- end: {re.escape(title)} -->\n?", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    path.write_text(text, encoding="utf-8")


def cpu_description() -> str:
    """", CPU model; vector units" from /proc/cpuinfo (empty elsewhere). Figures taken on different hosts of a
    cloud VM differ by more than any change under test (the fp32 encoder ran 1.7x faster on an AVX-512/AMX host
    than on the one before), so each section names the host's CPU."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags_line = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    flags = set(flags_line.group(1).split()) if flags_line else set()
    units = [name for name, flag in (("AVX2", "avx2"), ("AVX-512", "avx512f"), ("AVX-VNNI", "avx_vnni"),
                                     ("AVX-512 VNNI", "avx512_vnni"), ("AMX", "amx_tile")) if flag in flags]
    return (f", {model.group(1).strip()}" if model else "") + (f"; {' '.join(units)}" if units else "")


def _cores() -> int:
    import os

    return os.cpu_count() or 1


@dataclass
class MachineLoad:
    """The load average at a benchmark's start and end. A figure taken while other jobs load the cores misleads
    in both directions, so RESULTS.md is written only when the machine was quiet at the start (1-minute load
    at most half the cores; the end figure includes the benchmark's own threads) unless forced, and forced
    figures are labelled."""

    start: tuple[float, float, float] = field(default_factory=os.getloadavg)
    end: tuple[float, float, float] | None = None

    def finish(self) -> None:
        self.end = os.getloadavg()

    @property
    def busy(self) -> bool:
        return self.start[0] > _cores() / 2

    def note(self) -> str:
        def fmt(load: tuple[float, float, float]) -> str:
            return "/".join(f"{v:.1f}" for v in load)

        end = f", {fmt(self.end)} at the end" if self.end else ""
        return f"load average (1/5/15 min) {fmt(self.start)} at the start{end}; {_cores()} cores"

    def label_for_results(self, force: bool, results: Path) -> str:
        """The line to put beside the figures; refuses (SystemExit) a busy machine's figures unless `force`."""
        if self.busy and not force:
            raise SystemExit(f"not writing {results}: the machine was busy ({self.note()}); rerun when idle, "
                             f"or --force to write labelled figures")
        label = f"Machine: {self.note()}."
        if self.busy:
            label += " **Taken on a busy machine (--force): these figures may mislead in either direction.**"
        return label
