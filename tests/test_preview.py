"""`clipsearch search --preview / --paths-only / -0 / --copy-to / --link-to`: the three image protocols' escape
sequences decoded back to the thumbnail, terminal detection, the fallback to paths, path-only output in rank order
and gathering the results into a folder, against a real collection indexed with the bundled emoji-mini model."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsearch.cli import preview
from clipsearch.cli.handoff import HandoffError, check_folder, gather, target_name
from photo_fixtures import block_image
from terminal_fixtures import popen_on_terminal, read_terminal

CLI = [sys.executable, "-c", "from clipsearch.cli import main; main()"]
SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"
NAMES = ["red-heart", "blue-heart", "green-heart", "red-apple", "banana", "bicycle"]
QUERY = "red heart"


# ---------------------------------------------------------------- the escape sequences, decoded


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


KITTY_CODE = re.compile(r"\x1b_G([^;\x1b]*);([A-Za-z0-9+/=]*)\x1b\\")


def decode_kitty(text: str) -> tuple[list[dict], Image.Image]:
    """The control keys of each escape code and the image they carry; asserts the codes cover all of `text`."""
    codes = list(KITTY_CODE.finditer(text))
    assert codes and "".join(c.group(0) for c in codes) == text
    keys = [dict(kv.split("=") for kv in c.group(1).split(",")) for c in codes]
    payloads = [c.group(2) for c in codes]
    assert all(len(p) <= 4096 for p in payloads)
    assert all(len(p) % 4 == 0 for p in payloads[:-1])  # only the last chunk may be short
    assert [k["m"] for k in keys] == ["1"] * (len(codes) - 1) + ["0"]
    assert keys[0]["a"] == "T" and keys[0]["f"] == "100" and keys[0]["q"] == "2"
    assert all(set(k) == {"m"} for k in keys[1:])  # later chunks carry only m
    data = base64.b64decode("".join(payloads), validate=True)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return keys, Image.open(io.BytesIO(data))


def decode_iterm2(text: str) -> tuple[dict, Image.Image]:
    match = re.fullmatch(r"\x1b\]1337;File=([^:\x07]*):([A-Za-z0-9+/=]+)\x07", text)
    assert match, text[:80]
    args = dict(kv.split("=", 1) for kv in match.group(1).split(";"))
    data = base64.b64decode(match.group(2), validate=True)
    assert int(args["size"]) == len(data) and args["inline"] == "1"
    return args, Image.open(io.BytesIO(data))


def decode_sixel(text: str) -> tuple[tuple[int, int], dict[int, tuple[int, int, int]], list[str], np.ndarray]:
    """(declared size, palette in percent, bands, colour register per pixel, -1 where unpainted)."""
    match = re.fullmatch(r'\x1bP0;1;0q"1;1;(\d+);(\d+)((?:#\d+;2;\d+;\d+;\d+)*)(.*)\x1b\\', text, re.S)
    assert match, text[:80]
    width, height = int(match.group(1)), int(match.group(2))
    palette = {int(n): (int(r), int(g), int(b))
               for n, r, g, b in re.findall(r"#(\d+);2;(\d+);(\d+);(\d+)", match.group(3))}
    assert all(0 <= v <= 100 for rgb in palette.values() for v in rgb)
    data = match.group(4)
    assert re.fullmatch(r"[#0-9!$\-?-~]*", data)  # only selectors, repeats, CR, LF and sixel characters
    bands = data.split("-")
    pixels = np.full((len(bands) * 6, width), -1, dtype=np.int32)
    for b, band in enumerate(bands):
        for line in band.split("$"):
            selected = re.match(r"#(\d+)", line)
            assert selected and int(selected.group(1)) in palette
            x = 0
            for count, char in re.findall(r"(?:!(\d+))?([?-~])", line[selected.end():]):
                bits = ord(char) - 63
                for _ in range(int(count or 1)):
                    for row in range(6):
                        if bits >> row & 1:
                            assert pixels[b * 6 + row, x] == -1, "a pixel painted twice"
                            pixels[b * 6 + row, x] = int(selected.group(1))
                    x += 1
            assert x <= width
    return (width, height), palette, bands, pixels[:height]


def test_kitty_sends_the_png_in_base64_chunks_of_at_most_4096():
    image = noise(160, 120)
    keys, decoded = decode_kitty(preview.kitty(image))
    assert len(keys) > 10  # a noisy 160x120 PNG is far over 4096 bytes of base64
    assert decoded.size == image.size and np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(image))
    small_keys, small = decode_kitty(preview.kitty(Image.new("RGB", (4, 4), "red")))
    assert len(small_keys) == 1 and small_keys[0]["m"] == "0" and small.getpixel((0, 0))[:3] == (255, 0, 0)


def test_iterm2_inline_image_is_one_osc_1337_with_size_and_name():
    image = noise(90, 60, seed=1)
    args, decoded = decode_iterm2(preview.iterm2(image, name="/photos/beach day.jpg"))
    assert args["width"] == "90px" and args["height"] == "60px" and args["preserveAspectRatio"] == "1"
    assert base64.b64decode(args["name"]).decode() == "beach day.jpg"
    assert np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(image))


@pytest.mark.parametrize("height", [96, 100, 5, 1])
def test_sixel_palette_and_bands_decode_to_the_image(height):
    image = block_image(7, size=(120, height))  # 16 colour blocks: quantising loses nothing
    size, palette, bands, pixels = decode_sixel(preview.sixel(image))
    assert size == (120, height)
    assert len(bands) == math.ceil(height / 6)
    original = np.asarray(image).reshape(-1, 3)
    assert len(palette) == len(np.unique(original, axis=0))
    assert (pixels >= 0).all()  # every pixel painted exactly once
    rgb = np.array([palette[int(i)] for i in pixels.reshape(-1)], dtype=float) * 255 / 100
    assert np.abs(rgb - original).max() <= 1.3  # percent steps of the register definitions


def test_sixel_quantises_to_at_most_256_registers_and_compresses_runs():
    image = noise(200, 64, seed=3)
    size, palette, bands, pixels = decode_sixel(preview.sixel(image))
    assert size == (200, 64) and len(bands) == 11 and 2 <= len(palette) <= 256 and (pixels >= 0).all()
    flat = preview.sixel(Image.new("RGB", (300, 12), (0, 128, 255)))
    _, flat_palette, flat_bands, flat_pixels = decode_sixel(flat)
    assert len(flat_palette) == 1 and flat_bands == ["#0!300~", "#0!300~"] and (flat_pixels == 0).all()


# ---------------------------------------------------------------- detection and thumbnails


@pytest.mark.parametrize("env, protocol", [
    ({"TERM": "xterm-kitty"}, "kitty"),
    ({"TERM": "xterm-256color", "KITTY_WINDOW_ID": "3"}, "kitty"),
    ({"TERM_PROGRAM": "ghostty", "TERM": "xterm-ghostty"}, "kitty"),
    ({"TERM_PROGRAM": "iTerm.app", "TERM": "xterm-256color"}, "iterm2"),
    ({"TERM_PROGRAM": "WezTerm", "TERM": "xterm-256color"}, "iterm2"),
    ({"LC_TERMINAL": "iTerm2", "TERM": "xterm-256color"}, "iterm2"),  # iTerm2 over ssh
    ({"TERM": "foot"}, "sixel"),
    ({"TERM": "foot-extra"}, "sixel"),
    ({"TERM": "mlterm"}, "sixel"),
    ({"TERM": "xterm-sixel"}, "sixel"),
    ({"TERM": "xterm-256color"}, "none"),
    ({"TERM": "linux"}, "none"),
    ({}, "none"),
    ({"TERM": "tmux-256color", "TMUX": "/tmp/tmux-0/default,1,0", "KITTY_WINDOW_ID": "1"}, "none"),
    ({"TERM": "screen", "TERM_PROGRAM": "iTerm.app"}, "none"),
])
def test_terminals_are_detected_from_the_environment(env, protocol):
    assert preview.detect(env).protocol == protocol
    assert preview.choose(None, env, is_tty=True).protocol == protocol
    assert preview.choose("auto", env, is_tty=True).protocol == protocol


def test_a_pipe_gets_no_images_unless_the_protocol_is_forced():
    kitty_env = {"TERM": "xterm-kitty", preview.ENV_VAR: "sixel"}
    assert preview.choose(None, kitty_env, is_tty=False) == preview.Choice("none", "stdout is not a terminal")
    assert preview.choose(None, kitty_env, is_tty=True).protocol == "sixel"  # the variable replaces detection
    assert preview.choose(None, {"TERM": "xterm-kitty", preview.ENV_VAR: "none"}, is_tty=True).protocol == "none"
    assert preview.choose(None, {"TERM": "xterm-kitty", preview.ENV_VAR: "auto"}, is_tty=True).protocol == "kitty"
    for name in ("kitty", "iterm2", "sixel", "none"):
        assert preview.choose(name.upper(), {}, is_tty=False).protocol == name
    with pytest.raises(preview.PreviewError, match="unknown preview protocol 'png'") as info:
        preview.choose(None, {preview.ENV_VAR: "png"}, is_tty=True)
    assert "kitty, iterm2, sixel, none" in info.value.hint


def test_thumbnails_are_small_and_upright_and_unreadable_files_say_why(tmp_path):
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90° clockwise: portrait
    block_image(1, size=(400, 200)).save(rotated, exif=exif, quality=95)
    thumb = preview.thumbnail(str(rotated), 80)
    assert thumb.size == (40, 80) and thumb.mode == "RGB"
    wide = tmp_path / "wide.png"
    block_image(2, size=(2000, 100)).save(wide)
    assert preview.thumbnail(str(wide), 50).size == (150, 8)  # at most 3 x size wide
    emoji = preview.thumbnail(str(SAMPLE / "red-heart.png"), 32)  # RGBA on white, like the web thumbnails
    assert emoji.size == (32, 32) and emoji.getpixel((0, 0)) == (255, 255, 255)
    (tmp_path / "notes.txt").write_text("not an image")
    os.mkfifo(tmp_path / "fifo.jpg")
    for name, reason in [("missing.jpg", "no such file"), ("notes.txt", "not a recognised image format"),
                         ("fifo.jpg", r"not a regular file \(fifo\)")]:
        with pytest.raises(preview.PreviewError, match=reason) as info:
            preview.render(str(tmp_path / name), "kitty")
        assert str(tmp_path) not in info.value.message  # the path is printed beside the note, not twice
    with pytest.raises(preview.PreviewError):
        preview.encode(thumb, "none")


# ---------------------------------------------------------------- the copy/link library


def test_target_names_keep_rank_order_and_never_collide(tmp_path):
    assert target_name(1, 10, "/a/beach.jpg") == "01-beach.jpg"
    assert target_name(7, 150, "/a/beach.jpg") == "007-beach.jpg"
    assert target_name(3, 5, "/a/beach.tar.jpg", attempt=2) == "03-beach.tar (2).jpg"
    assert target_name(3, 5, "/a/README", attempt=3) == "03-README (3)"
    sources = [str(SAMPLE / f"{n}.png") for n in ("red-heart", "banana")]
    first = gather(sources, tmp_path / "new" / "deeper", "copy")
    assert [Path(g.target).name for g in first.gathered] == ["01-red-heart.png", "02-banana.png"]
    again = gather(sources, tmp_path / "new" / "deeper", "copy")
    assert [Path(g.target).name for g in again.gathered] == ["01-red-heart (2).png", "02-banana (2).png"]
    third = gather(sources, tmp_path / "new" / "deeper", "link")
    assert [Path(g.target).name for g in third.gathered] == ["01-red-heart (3).png", "02-banana (3).png"]
    reordered = gather(sources[::-1], tmp_path / "new" / "deeper", "copy")
    assert [Path(g.target).name for g in reordered.gathered] == ["01-banana.png", "02-red-heart.png"]
    assert sorted(os.listdir(tmp_path / "new" / "deeper")) == [
        "01-banana.png", "01-red-heart (2).png", "01-red-heart (3).png", "01-red-heart.png", "02-banana (2).png",
        "02-banana (3).png", "02-banana.png", "02-red-heart.png"]
    assert (tmp_path / "new" / "deeper" / "01-red-heart.png").read_bytes() == Path(sources[0]).read_bytes()


def test_a_long_name_is_shortened_in_its_stem_and_a_dangling_link_is_refused_before_searching(tmp_path):
    long_source = tmp_path / ("é" * 125 + ".png")  # 250 + 4 bytes: a valid name, too long with "01-" and " (2)"
    long_source.write_bytes((SAMPLE / "red-heart.png").read_bytes())
    for attempt in (1, 2):
        report = gather([str(long_source)], tmp_path / "out", "copy")
        assert not report.skipped and len(report.gathered) == 1
        name = Path(report.gathered[0].target).name
        assert len(os.fsencode(name)) <= 255 and name.startswith("01-é")
        assert name.endswith(" (2).png" if attempt == 2 else "é.png")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(HandoffError, match="a symbolic link to .*nowhere, which does not exist"):
        check_folder(tmp_path / "dangling", "--copy-to")


def test_destination_folders_that_cannot_be_used_are_refused(tmp_path):
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(HandoffError, match="exists and is not a folder") as info:
        check_folder(tmp_path / "file.jpg", "--copy-to")
    assert "--copy-to" in info.value.hint
    with pytest.raises(HandoffError, match="is not a folder"):
        gather([str(SAMPLE / "banana.png")], tmp_path / "file.jpg" / "sub", "link")
    assert check_folder(tmp_path / "a" / "b") == tmp_path / "a" / "b" and not (tmp_path / "a").exists()


# ---------------------------------------------------------------- the CLI on a real collection


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> dict:
    """Six sample_data emoji indexed with the bundled emoji-mini model; the JSON answer to QUERY."""
    base = tmp_path_factory.mktemp("preview-collection")
    photos = base / "photos"
    photos.mkdir()
    for name in NAMES:
        shutil.copy(SAMPLE / f"{name}.png", photos / f"{name}.png")
    env = {**os.environ, "CLIPSEARCH_HOME": str(base / "home"), "CLIPSEARCH_OFFLINE": "1"}
    for var in ("CLIPSEARCH_PREVIEW", "KITTY_WINDOW_ID", "TERM_PROGRAM", "LC_TERMINAL", "TMUX"):
        env.pop(var, None)
    root = str(base / "idx")
    done = subprocess.run([*CLI, "index", str(photos), "-c", "p", "--index-dir", root], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    info = {"base": base, "photos": photos, "env": env, "args": ["-c", "p", "--index-dir", root]}
    rows = json.loads(search(info, QUERY, "-k", "5", "--json").stdout)
    assert len(rows) == 5 and rows[0]["path"] == str(photos / "red-heart.png")
    info["rows"] = rows
    info["paths"] = [r["path"] for r in rows]
    return info


def search(info: dict, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([*CLI, "search", *args, *info["args"]], capture_output=True, text=True,
                            env={**info["env"], **(env or {})}, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
    return result


def test_paths_only_and_null_print_exactly_the_paths_in_rank_order(collection):
    lines = search(collection, QUERY, "-k", "5", "--paths-only")
    assert lines.stdout == "".join(p + "\n" for p in collection["paths"])
    for flags in (["-0"], ["--null"], ["--paths-only", "-0"]):
        nul = search(collection, QUERY, "-k", "5", *flags)
        assert nul.stdout == "".join(p + "\0" for p in collection["paths"]), flags
    # What xargs -0 receives, byte for byte, including a path with spaces and a newline in its name.
    odd = collection["photos"] / "odd name\nwith newline.png"
    shutil.copy(SAMPLE / "red-heart.png", odd)
    try:
        subprocess.run([*CLI, "index", str(collection["photos"]), *collection["args"]], check=True,
                       capture_output=True, env=collection["env"], timeout=300)
        raw = subprocess.run([*CLI, "search", QUERY, "-k", "7", "-0", *collection["args"]], capture_output=True,
                             env=collection["env"], timeout=120)
        assert raw.returncode == 0 and raw.stdout.endswith(b"\0")
        assert os.fsencode(odd) in raw.stdout.split(b"\0")
    finally:
        odd.unlink()
        subprocess.run([*CLI, "index", str(collection["photos"]), *collection["args"]], check=True,
                       capture_output=True, env=collection["env"], timeout=300)


def test_preview_into_a_pipe_is_the_plain_listing(collection):
    plain = search(collection, QUERY, "-k", "5")
    kitty_terminal = {"TERM": "xterm-kitty", "KITTY_WINDOW_ID": "1", "CLIPSEARCH_PREVIEW": "kitty"}
    previewed = search(collection, QUERY, "-k", "5", "--preview", env=kitty_terminal)
    assert previewed.stdout == plain.stdout and "\x1b" not in previewed.stdout
    assert previewed.stderr == ""  # nothing to say: a pipe never gets images
    assert [line.split()[-1] for line in plain.stdout.splitlines()] == collection["paths"]


@pytest.mark.parametrize("protocol", ["kitty", "iterm2", "sixel"])
def test_a_forced_protocol_draws_a_thumbnail_under_each_result(collection, protocol):
    result = search(collection, QUERY, "-k", "3", "--preview-protocol", protocol, "--preview-size", "40")
    images = {"kitty": r"(?:\x1b_G[^\x1b]*\x1b\\)+", "iterm2": r"\x1b\]1337;[^\x07]*\x07",
              "sixel": r"\x1bP[^\x1b]*\x1b\\"}[protocol]
    pattern = "".join(rf"\s+{rank}  \S+  {re.escape(path)}\n({images})\n"
                      for rank, path in enumerate(collection["paths"][:3], 1))
    match = re.fullmatch(pattern, result.stdout)
    assert match, result.stdout[:300]
    first = match.group(1)
    if protocol == "kitty":
        shown = decode_kitty(first)[1]
    elif protocol == "iterm2":
        args, shown = decode_iterm2(first)
        assert base64.b64decode(args["name"]).decode() == "red-heart.png"
    else:
        size, palette, bands, _ = decode_sixel(first)
        assert size == (40, 40) and len(bands) == 7
        return
    expected = preview.thumbnail(collection["paths"][0], 40)
    assert shown.size == (40, 40) and np.array_equal(np.asarray(shown.convert("RGB")), np.asarray(expected))


def test_copy_to_gathers_the_results_in_rank_order_without_overwriting(collection, tmp_path):
    out = tmp_path / "picked"
    result = search(collection, QUERY, "-k", "5", "--json", "--copy-to", str(out))
    rows = json.loads(result.stdout)  # still JSON, with where each result went
    assert [r["path"] for r in rows] == collection["paths"]
    names = [f"{rank:02d}-{Path(p).name}" for rank, p in enumerate(collection["paths"], 1)]
    assert [r["gathered"] for r in rows] == [str(out / n) for n in names]
    assert sorted(os.listdir(out)) == names
    for name, source in zip(names, collection["paths"]):
        assert not (out / name).is_symlink() and (out / name).read_bytes() == Path(source).read_bytes()
    assert f"copied 5 of 5 results into {out}" in result.stderr
    again = search(collection, QUERY, "-k", "2", "--paths-only", "--copy-to", str(out))
    assert again.stdout == "".join(p + "\n" for p in collection["paths"][:2])  # the sources, nothing else
    assert sorted(os.listdir(out)) == sorted(names + ["01-red-heart (2).png", f"02-{Path(collection['paths'][1]).stem} (2).png"])
    assert (out / "01-red-heart (2).png").read_bytes() == (out / "01-red-heart.png").read_bytes()


def test_link_to_makes_absolute_symlinks_to_the_results(collection, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = search(collection, QUERY, "-k", "4", "--link-to", "links")  # relative DIR, absolute targets
    assert [line.split()[-1] for line in result.stdout.splitlines()] == collection["paths"][:4]
    out = tmp_path / "links"
    for rank, source in enumerate(collection["paths"][:4], 1):
        link = out / f"{rank:02d}-{Path(source).name}"
        assert link.is_symlink() and os.readlink(link) == source and os.path.isabs(os.readlink(link))
    assert len(os.listdir(out)) == 4 and f"linked 4 of 4 results into {out}" in result.stderr


def test_missing_files_are_noted_and_skipped(collection, tmp_path):
    first, second = collection["paths"][:2]
    kept = tmp_path / "kept"
    shutil.move(first, kept)  # the collection still lists it
    try:
        shown = search(collection, QUERY, "-k", "2", "--preview-protocol", "kitty")
        lines = shown.stdout.split("\n")
        assert lines[0].endswith(first) and lines[1] == "     (no preview: no such file)"
        assert lines[2].endswith(second) and lines[3].startswith("\x1b_G")
        # The listing stays as scripts read it; stderr says which result is gone, --json says it per row.
        plain = search(collection, QUERY, "-k", "2")
        assert [line.split()[-1] for line in plain.stdout.splitlines()] == [first, second]
        assert f"note: 1 of the 2 results is no longer on disk (moved or deleted since indexing): {first}" in plain.stderr
        assert "clipsearch index" in plain.stderr
        rows = json.loads(search(collection, QUERY, "-k", "2", "--json").stdout)
        assert [(r["path"], r["missing"]) for r in rows] == [(first, True), (second, False)]
        out = tmp_path / "out"
        copied = search(collection, QUERY, "-k", "2", "--copy-to", str(out), "--json")
        assert [r["gathered"] for r in json.loads(copied.stdout)] == [None, str(out / f"02-{Path(second).name}")]
        assert f"skipped {first}: no such file" in copied.stderr and "copied 1 of 2 results" in copied.stderr
        assert "no longer on disk" not in copied.stderr  # said once, by the gathering report
        none = search(collection, QUERY, "-k", "1", "--link-to", str(tmp_path / "none"), check=False)
        assert none.returncode == 1 and "Traceback" not in none.stderr
        assert f"skipped {first}: no such file" in none.stderr
        assert "error: none of the 1 results could be linked into" in none.stderr and "clipsearch index" in none.stderr
        assert none.stdout.split()[-1] == first  # the listing was printed before the error
        assert not (tmp_path / "none").exists()  # the folder it made for them is not left behind empty
    finally:
        shutil.move(kept, first)


def test_a_url_row_is_skipped_as_a_url_not_as_a_missing_file(tmp_path):
    photo = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(photo)
    report = gather(["https://example.com/cat.jpg", str(photo)], tmp_path / "out", "copy")
    assert [(s.rank, s.reason) for s in report.skipped] == [(1, "a URL (an imported row), not a file on this machine")]
    assert [g.target for g in report.gathered] == [str(tmp_path / "out" / "02-a.png")]


@pytest.mark.parametrize("flags", [
    ["--json", "--paths-only"], ["--json", "-0"], ["--json", "--preview"], ["--paths-only", "--preview"],
    ["-0", "--preview-protocol", "kitty"], ["--json", "--preview-protocol", "none"],
    ["--copy-to", "a", "--link-to", "b"], ["--preview-protocol", "png"], ["--preview-size", "0", "--preview"],
])
def test_conflicting_or_bad_options_are_usage_errors(collection, tmp_path, flags, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = search(collection, QUERY, *flags, check=False)
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    assert "Usage:" in result.stderr
    assert not (Path.cwd() / "a").exists() and not (Path.cwd() / "b").exists()


def test_a_destination_that_is_a_file_is_a_clear_error_before_searching(collection, tmp_path):
    target = tmp_path / "taken.jpg"
    target.write_bytes(b"not a folder")
    for option in ("--copy-to", "--link-to"):
        result = search(collection, QUERY, option, str(target), check=False)
        assert result.returncode == 1 and result.stdout == "" and "Traceback" not in result.stderr
        assert f"error: {option} {target}: exists and is not a folder" in result.stderr
        assert f"give {option} a new or existing folder" in result.stderr
    assert target.read_bytes() == b"not a folder"


def search_in_a_terminal(info: dict, *args: str, env: dict) -> tuple[int, str, str]:
    """Run the search with stdout on a pseudo-terminal (raw: no newline translation): (exit code, stdout, stderr)."""
    proc, master = popen_on_terminal([*CLI, "search", *args, *info["args"]], "stdout", {**info["env"], **env}, raw=True)
    shown = read_terminal(master)
    code = proc.wait(timeout=120)
    return code, shown.decode(), proc.stderr.read().decode()


def test_a_terminal_is_detected_and_told_when_it_shows_no_images(collection):
    clean = {"TERM": "xterm-256color", "CLIPSEARCH_PREVIEW": "", "KITTY_WINDOW_ID": "", "TERM_PROGRAM": "",
             "LC_TERMINAL": "", "TMUX": ""}
    code, out, err = search_in_a_terminal(collection, QUERY, "-k", "2", "--preview", "--preview-size", "24",
                                          env={**clean, "TERM": "xterm-kitty"})
    assert code == 0 and err == "" and out.count("\x1b_Ga=T,f=100") == 2
    code, out, err = search_in_a_terminal(collection, QUERY, "-k", "2", "--preview",
                                          env={**clean, "TERM_PROGRAM": "WezTerm"})
    assert code == 0 and out.count("\x1b]1337;File=") == 2
    code, out, err = search_in_a_terminal(collection, QUERY, "-k", "2", "--preview",
                                          env={**clean, "CLIPSEARCH_PREVIEW": "sixel"})
    assert code == 0 and out.count("\x1bP0;1;0q") == 2
    code, out, err = search_in_a_terminal(collection, QUERY, "-k", "2", "--preview", env=clean)
    assert code == 0 and "\x1b" not in out and [line.split()[-1] for line in out.splitlines()] == collection["paths"][:2]
    assert "note: no thumbnails (this terminal is not known to show images)" in err and "CLIPSEARCH_PREVIEW" in err
    code, out, err = search_in_a_terminal(collection, QUERY, "--preview", env={**clean, "CLIPSEARCH_PREVIEW": "png"})
    assert code == 1 and out == "" and "error: unknown preview protocol 'png'" in err and "Traceback" not in err
