"""Inline thumbnails for `clipsearch search --preview`: terminal detection and three image protocols.

Protocols (all produce a plain string to write to the terminal):

- ``kitty``: the kitty graphics protocol, a PNG sent base64 in chunks of at most 4096 bytes
  (``ESC _ G a=T,f=100,q=2,m=1;<chunk> ESC \\`` ... ``m=0``); also understood by Ghostty and WezTerm.
- ``iterm2``: iTerm2's inline images, ``ESC ] 1337 ; File=inline=1;... : <base64 PNG> BEL``; also WezTerm.
- ``sixel``: DEC sixel graphics, the thumbnail quantised to at most 256 colours (foot, mlterm, xterm -ti vt340,
  WezTerm, Windows Terminal ≥ 1.22 ...).

Detection reads the environment as chafa, timg and yazi do (no terminal queries, so nothing can hang and no
reply is left in the input): kitty (``KITTY_WINDOW_ID``, ``TERM=xterm-kitty``, Ghostty), iTerm2
(``TERM_PROGRAM=iTerm.app`` or ``WezTerm``, ``LC_TERMINAL=iTerm2``), sixel (``TERM`` containing ``sixel``,
foot, mlterm, yaft, contour). Inside tmux or screen nothing is detected (they drop the sequences unless
configured for passthrough). ``CLIPSEARCH_PREVIEW=kitty|iterm2|sixel|none`` names the terminal's protocol instead
of detecting it, and still shows images only when stdout is a terminal; ``--preview-protocol`` forces a
protocol even into a pipe (e.g. for ``less -R`` in kitty, or a test).

Thumbnails are decoded with the indexer's own `open_image` (EXIF orientation applied, transparency on white,
non-regular files and decompression bombs refused), so an unreadable file becomes a `PreviewError` with its
reason, never a traceback. Pillow and numpy are imported inside the functions: `clipsearch --help` stays fast.
"""

from __future__ import annotations

import base64
import io
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Optional

from ..errors import ClipsearchError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

PROTOCOLS = ("kitty", "iterm2", "sixel", "none")
ENV_VAR = "CLIPSEARCH_PREVIEW"
DEFAULT_SIZE = 160
KITTY_CHUNK = 4096  # the kitty protocol's largest payload per escape code (a multiple of 4: base64 stays aligned)


class PreviewError(ClipsearchError):
    """A thumbnail could not be made (missing, unreadable or undecodable file) or a protocol name is unknown."""


@dataclass(frozen=True)
class Choice:
    """Which protocol to use and why (`reason` is for a note on stderr)."""

    protocol: str  # one of PROTOCOLS
    reason: str


def check_protocol(name: str) -> str:
    """`name` lower-cased if it is one of PROTOCOLS (or "auto"), else PreviewError."""
    value = name.strip().lower()
    if value not in (*PROTOCOLS, "auto"):
        raise PreviewError(f"unknown preview protocol {name!r}", hint=f"use one of: auto, {', '.join(PROTOCOLS)}")
    return value


def detect(env: Mapping[str, str]) -> Choice:
    """The image protocol the terminal described by `env` speaks, from environment variables only."""
    term = env.get("TERM", "").lower()
    program = env.get("TERM_PROGRAM", "")
    if env.get("TMUX") or term.startswith(("screen", "tmux")):
        return Choice("none", "inside tmux/screen, which pass no images on by default")
    if env.get("KITTY_WINDOW_ID") or term == "xterm-kitty":
        return Choice("kitty", "kitty")
    if program.lower() == "ghostty" or term == "xterm-ghostty":
        return Choice("kitty", "Ghostty")
    if program in ("iTerm.app", "WezTerm") or env.get("LC_TERMINAL") == "iTerm2":
        return Choice("iterm2", program or "iTerm2")
    if "sixel" in term or term.split("-")[0] in ("foot", "mlterm", "yaft", "contour"):
        return Choice("sixel", f"TERM={term}")
    if program.lower() in ("mlterm", "contour"):
        return Choice("sixel", program)
    return Choice("none", "this terminal is not known to show images")


def choose(forced: Optional[str], env: Mapping[str, str], is_tty: bool) -> Choice:
    """The protocol for this run: `forced` (the --preview-protocol value; "auto" or None to decide here) wins even
    when stdout is not a terminal; otherwise nothing is drawn into a pipe or file, and CLIPSEARCH_PREVIEW, if set,
    replaces detection."""
    if forced is not None and check_protocol(forced) != "auto":
        return Choice(check_protocol(forced), "--preview-protocol")
    if not is_tty:
        return Choice("none", "stdout is not a terminal")
    named = env.get(ENV_VAR, "").strip()
    if named and check_protocol(named) != "auto":
        return Choice(check_protocol(named), ENV_VAR)
    return detect(env)


def thumbnail(path: str, size: int = DEFAULT_SIZE) -> "Image.Image":
    """The image at `path` as an RGB thumbnail at most `size` px high (and 3 * `size` wide), EXIF-upright."""
    from ..errors import ImageError
    from ..model.preprocess import open_image

    if size < 1:
        raise PreviewError(f"preview size must be at least 1 px, not {size}")
    try:
        image = open_image(path, draft_size=(size * 3, size))
    except ImageError as exc:
        raise PreviewError(exc.message.removeprefix(f"{path}: ")) from exc
    image.thumbnail((size * 3, size))
    return image


def _png_base64(image: "Image.Image") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return base64.standard_b64encode(buffer.getvalue()).decode("ascii")


def kitty(image: "Image.Image") -> str:
    """The kitty graphics escape codes that transmit and show `image` at the cursor (a PNG, `q=2`: no replies)."""
    data = _png_base64(image)
    chunks = [data[i:i + KITTY_CHUNK] for i in range(0, len(data), KITTY_CHUNK)] or [""]
    out = []
    for i, chunk in enumerate(chunks):
        more = 1 if i < len(chunks) - 1 else 0
        keys = f"a=T,f=100,q=2,m={more}" if i == 0 else f"m={more}"
        out.append(f"\x1b_G{keys};{chunk}\x1b\\")
    return "".join(out)


def iterm2(image: "Image.Image", name: str = "") -> str:
    """iTerm2's OSC 1337 inline-image sequence for `image` as a PNG, sized in pixels."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    payload = buffer.getvalue()
    label = base64.standard_b64encode(os.path.basename(name).encode("utf-8", "surrogateescape")).decode("ascii")
    args = [f"name={label}"] if name else []
    args += [f"size={len(payload)}", f"width={image.width}px", f"height={image.height}px",
             "preserveAspectRatio=1", "inline=1"]
    return f"\x1b]1337;File={';'.join(args)}:{base64.standard_b64encode(payload).decode('ascii')}\x07"


_RUN = re.compile(r"(.)\1{3,}")  # four or more equal sixels: worth a "!<count><sixel>" repeat


def _repeat(match: re.Match) -> str:
    return f"!{len(match.group(0))}{match.group(1)}"


def sixel(image: "Image.Image", colors: int = 256) -> str:
    """DEC sixel graphics for `image`: quantised to at most `colors` (≤ 256) colours, one colour register each
    (``#n;2;r;g;b`` in percent), then one band per 6 rows (``-`` between bands, ``$`` between colours)."""
    import numpy as np
    from PIL import Image

    colors = max(2, min(256, colors))
    rgb = image.convert("RGB")
    quantised = rgb.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    indices = np.asarray(quantised, dtype=np.uint8)
    height, width = indices.shape
    used = np.unique(indices)
    palette = quantised.getpalette() or []
    out = [f'\x1bP0;1;0q"1;1;{width};{height}']  # aspect 1:1, unpainted pixels keep the background
    for c in used:
        r, g, b = (round(v * 100 / 255) for v in palette[3 * int(c):3 * int(c) + 3])
        out.append(f"#{int(c)};2;{r};{g};{b}")
    weights = (1 << np.arange(6, dtype=np.uint8)).reshape(6, 1)
    bands = []
    for top in range(0, height, 6):
        band = indices[top:top + 6]
        rows = band.shape[0]
        lines = []
        for c in np.unique(band):
            bits = ((band == c).astype(np.uint8) * weights[:rows]).sum(axis=0, dtype=np.uint8)
            text = (bits + 63).tobytes().decode("ascii").rstrip("?")
            lines.append(f"#{int(c)}{_RUN.sub(_repeat, text)}")
        bands.append("$".join(lines))
    out.append("-".join(bands))
    out.append("\x1b\\")
    return "".join(out)


def encode(image: "Image.Image", protocol: str, name: str = "") -> str:
    """`image` in `protocol` ("kitty", "iterm2" or "sixel")."""
    if protocol == "kitty":
        return kitty(image)
    if protocol == "iterm2":
        return iterm2(image, name)
    if protocol == "sixel":
        return sixel(image)
    raise PreviewError(f"no image encoder for protocol {protocol!r}")


def render(path: str, protocol: str, size: int = DEFAULT_SIZE) -> str:
    """The escape sequence showing the thumbnail of `path`; PreviewError (with the reason) if it cannot be read."""
    return encode(thumbnail(path, size), protocol, name=path)
