"""Arguments that are not valid UTF-8 (bytes from a script or a terminal in another encoding): a clear error
with exit code 2 for text, while existing file and folder names in the file system's own bytes still work."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from clipsearch.store.collection import Collection
from clipsearch.indexer.pipeline import IndexOptions
from clipsearch.indexer.runner import index_paths
from clipsearch.model.runtime import ClipModel
from photo_fixtures import block_image, make_photos

CLI = [os.fsencode(a) for a in (sys.executable, "-c", "from clipsearch.cli import main; main()")]


def run(*args: bytes, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, env=env, timeout=120)


@pytest.fixture()
def setup(tmp_path, tiny_bundle):
    photos = tmp_path / "photos"
    make_photos(photos, 4)
    root = tmp_path / "idx"
    index_paths(Collection.create("u", root), ClipModel(tiny_bundle, threads=1), [str(photos)], IndexOptions(workers=0))
    env = {**os.environ, "CLIPSEARCH_HOME": str(tmp_path / "home")}
    return tmp_path, os.fsencode(root), env


def test_text_that_is_not_utf8_is_a_clear_error(setup):
    tmp_path, root, env = setup
    for args in ([b"search", b"caf\xe9 au lait", b"-c", b"u", b"--index-dir", root],
                 [b"search", b"x", b"--and", b"\xff\xfe", b"-c", b"u", b"--index-dir", root],
                 [b"search", b"x", b"--collection", b"\xff", b"--index-dir", root],
                 [b"embed", b"--text", b"\xe9"],
                 [b"classify", os.fsencode(tmp_path / "photos"), b"--labels", b"caf\xe9,tea"]):
        result = run(*args, env=env)
        stderr = result.stderr.decode("utf-8", "replace")
        assert result.returncode == 2, (args, stderr)
        assert "is not valid UTF-8" in stderr and "Traceback" not in stderr, (args, stderr)
    shown = run(b"search", b"caf\xe9", b"-c", b"u", b"--index-dir", root, env=env).stderr.decode()
    assert "argument 'caf\\xe9' is not valid UTF-8" in shown


def test_existing_non_utf8_file_names_still_work(setup):
    tmp_path, root, env = setup
    folder = os.fsencode(tmp_path) + b"/caf\xe9"
    os.mkdir(folder)
    image = folder + b"/query\xff.png"
    block_image(4242).save(os.fsdecode(image))
    result = run(b"search", b"--image", image, b"-k", b"2", b"-c", b"u", b"--index-dir", root, b"--json", env=env)
    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")
    assert len(__import__("json").loads(result.stdout)) == 2
    # Indexing such a folder skips what cannot be stored, with the reason, instead of failing.
    indexed = run(b"index", folder, b"-c", b"u", b"--index-dir", root, env=env)
    stderr = indexed.stderr.decode("utf-8", "replace")
    assert indexed.returncode == 0 and "not valid UTF-8" in stderr and "Traceback" not in stderr
    with Collection.open("u", os.fsdecode(root)) as collection:
        assert collection.store.count() == 4 and collection.check().ok


@pytest.mark.parametrize("argv, allowed", [
    (["search", "a dog"], True),
    (["index", "photos", "--json"], True),
    (["index", "photos", "--watch"], False),  # runs until stopped
    (["index", "photos", "--ray"], False),  # Ray shuts down in an atexit handler
    (["index", "photos", "--ray=ray://head:10001"], False),
    (["index", "--", "--watch"], False),  # a path that looks like the option: only a slower exit
    (["serve"], False),
    (["classify", "photos", "--labels", "cat,dog"], False),
    ([], False),
])
def test_which_commands_end_without_interpreter_teardown(argv, allowed):
    from clipsearch.cli import quick_exit_allowed

    assert quick_exit_allowed(argv) is allowed


def test_an_interrupted_rebuild_says_the_old_index_still_serves_and_a_rerun_starts_over(capsys):
    from clipsearch.cli.index_cmds import _interrupted

    assert _interrupted("c", 50, 2, rebuild=True).exit_code == 130
    line = capsys.readouterr().err
    assert "rebuild interrupted; searches still use the index it was replacing (50 images)" in line
    assert "index --rebuild again to start it over" in line and "so far" not in line
    assert _interrupted("c", 12, 15).exit_code == 143
    assert "c: interrupted; run again to finish (12 images indexed so far)" in capsys.readouterr().err


def test_every_command_and_subcommand_prints_its_help():
    # `models pull --help` once died in rich's markup parser on "[/SUBFOLDER]": help is read as markup.
    from typer.main import get_command

    from clipsearch.cli import app

    root = get_command(app)
    paths: list[list[str]] = []

    def walk(command, path: list[str]) -> None:  # click's Command/Group (typer may carry its own click)
        paths.append(path)
        for name, sub in (getattr(command, "commands", None) or {}).items():
            walk(sub, [*path, name])

    walk(root, [])
    assert ["models", "pull"] in paths and ["index"] in paths and len(paths) > 15
    env = {**os.environ, "COLUMNS": "100"}
    for path in paths:
        result = subprocess.run([sys.executable, "-c", "from clipsearch.cli import main; main()", *path, "--help"],
                                capture_output=True, text=True, timeout=120, env=env)
        assert result.returncode == 0 and "Traceback" not in result.stderr, (path, result.stderr[-500:])
        assert "Usage:" in result.stdout, path


def test_version_is_printed_and_every_option_has_help():
    from typer.main import get_command

    import clipsearch
    from clipsearch.cli import app

    result = subprocess.run([sys.executable, "-c", "from clipsearch.cli import main; main()", "--version"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout == f"clipsearch {clipsearch.__version__}\n"
    bare, options = [], []

    def walk(command, path: list[str]) -> None:
        for param in command.params:
            if getattr(param, "param_type_name", "") == "option" and "--help" not in param.opts:
                options.append(param)
                if not param.help:
                    bare.append((" ".join(path), param.opts[0]))
        for name, sub in (getattr(command, "commands", None) or {}).items():
            walk(sub, [*path, name])

    walk(get_command(app), [])
    assert len(options) > 100 and bare == []


def test_a_second_ctrl_c_while_exiting_prints_no_traceback(monkeypatch):
    import signal

    import clipsearch.cli as cli

    exits: list[int] = []

    def interrupted_again() -> int:
        raise KeyboardInterrupt  # the second Ctrl-C, while the first one's "interrupted" line was being printed

    def record_exit(code: int) -> None:
        exits.append(code)
        raise SystemExit(code)

    previous = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(cli, "_run_to_exit_code", interrupted_again)
    monkeypatch.setattr(cli.os, "_exit", record_exit)
    monkeypatch.setattr(cli.sys, "argv", ["clipsearch", "index", "photos"])
    try:
        with pytest.raises(SystemExit):
            cli.main()
        assert exits == [130] and signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # a third one is ignored too
    finally:
        signal.signal(signal.SIGINT, previous)


def test_binary_sizes_are_named_as_binary():
    # `--max-index-memory 2GB` is 2e9 bytes (powers of 1000); shown in powers of 1024 it must say GiB, not GB.
    from clipsearch.store.tokens import format_bytes

    assert [format_bytes(n) for n in (512, 7252, 5 * 2**20, 2_000_000_000)] == \
        ["512 B", "7.1 KiB", "5.0 MiB", "1.86 GiB"]


def test_a_url_without_ray_is_refused_up_front_and_a_file_url_is_its_folder(tmp_path, tiny_bundle):
    from clipsearch.store.collection import list_collections

    env = {**os.environ, "CLIPSEARCH_HOME": str(tmp_path / "home")}
    root = str(tmp_path / "idx")
    cli = [sys.executable, "-c", "from clipsearch.cli import main; main()", "index"]
    remote = subprocess.run([*cli, "s3://bucket/photos", "-c", "r", "--index-dir", root, "--model", str(tiny_bundle)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert remote.returncode == 2 and "s3://bucket/photos is a URL: without --ray" in " ".join(remote.stderr.split())
    assert list_collections(root) == []
    make_photos(tmp_path / "photos", 3)
    local = subprocess.run([*cli, (tmp_path / "photos").as_uri(), "-c", "f", "--index-dir", root, "--model",
                            str(tiny_bundle), "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert local.returncode == 0, local.stderr
    assert '"added": 3' in local.stdout


def test_a_clipsearch_home_that_is_a_file_is_named_as_the_problem(tmp_path):
    home = tmp_path / "home-file"
    home.write_text("not a folder")
    for args in (["search", "a dog"], ["index", str(tmp_path)], ["stats"]):
        done = subprocess.run([sys.executable, "-m", "clipsearch", *args], capture_output=True, text=True,
                              timeout=120, env={**os.environ, "CLIPSEARCH_HOME": str(home), "CLIPSEARCH_HELPER": "0"})
        assert done.returncode == 1 and f"CLIPSEARCH_HOME={home} is a file, not a folder" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
