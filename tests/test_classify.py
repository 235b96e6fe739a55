"""Zero-shot classification: prompt ensembling, probabilities, label parsing, and the folder CLI."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from clipsearch.classify import DEFAULT_TEMPLATES, Classifier, classify, fill_template, parse_labels
from clipsearch.store.collection import Collection
from clipsearch.errors import QueryError
from clipsearch.indexer.pipeline import IndexOptions
from clipsearch.indexer.runner import index_paths
from clipsearch.model.runtime import ClipModel
from photo_fixtures import block_image, make_photos

CLI = [sys.executable, "-c", "from clipsearch.cli import main; main()"]


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return ClipModel(tiny_bundle, threads=1)


def test_label_vectors_are_the_normalised_mean_of_normalised_template_embeddings(model):
    classifier = Classifier(model, ["cat", "dog"])
    for row, label in enumerate(["cat", "dog"]):
        prompts = model.encode_text([t.format(label) for t in DEFAULT_TEMPLATES])
        prompts /= np.linalg.norm(prompts, axis=1, keepdims=True)
        mean = prompts.mean(axis=0)
        np.testing.assert_allclose(classifier.label_vectors[row], mean / np.linalg.norm(mean), atol=1e-5)
    assert len(DEFAULT_TEMPLATES) == 7


def test_probabilities_are_a_softmax_over_scaled_cosines(model):
    labels = ["cat", "dog", "car"]
    classifier = Classifier(model, labels)
    image = model.encode_images([block_image(3)])[0]
    scores = classifier.classify_vector(image)
    assert sorted(s.label for s in scores) == sorted(labels)
    assert sum(s.probability for s in scores) == pytest.approx(1.0, abs=1e-6)
    assert [s.probability for s in scores] == sorted((s.probability for s in scores), reverse=True)
    sims = classifier.label_vectors @ image
    logits = model.info.logit_scale * sims
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    by_label = {s.label: s.probability for s in scores}
    np.testing.assert_allclose([by_label[label] for label in labels], expected, rtol=1e-5)
    # An image vector equal to a label's vector is classified as that label.
    assert classifier.classify_vector(classifier.label_vectors[2])[0].label == "car"
    # The one-call API agrees with the Classifier.
    assert classify(model, block_image(3), labels)[0] == (scores[0].label, pytest.approx(scores[0].probability, rel=1e-5))


def test_parse_labels(tmp_path):
    assert parse_labels(" cat, dog ,cat,, car ") == ["cat", "dog", "car"]
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("# animals\nhorse\nsea lion, owl\n\n", encoding="utf-8")
    assert parse_labels("cat", labels_file) == ["cat", "horse", "sea lion", "owl"]
    with pytest.raises(QueryError, match="no labels"):
        parse_labels(" , ")
    with pytest.raises(QueryError, match="cannot read labels file"):
        parse_labels(None, tmp_path / "missing.txt")
    with pytest.raises(QueryError, match="template"):
        Classifier(object(), ["cat"], templates=("no placeholder",))


def test_labels_the_model_reads_alike_are_one_label_and_a_bom_is_not_part_of_one(tmp_path, model):
    bom = tmp_path / "bom.txt"
    bom.write_text("heart\napple\n", encoding="utf-8-sig")  # Notepad's and Excel's UTF-8
    assert parse_labels("heart", bom) == ["heart", "apple"]
    with pytest.raises(QueryError, match="labels 'heart' and 'Heart ' are the same text|labels 'heart' and 'Heart'"):
        Classifier(model, ["heart", "Heart", "apple"])
    assert Classifier(model, ["heart", "hearts", "apple"]).labels == ["heart", "hearts", "apple"]


def test_a_template_with_other_braces_keeps_them_and_fills_every_placeholder(model):
    odd = ("a {} and a {}", "a {} in {braces}", "a {} {")
    assert [fill_template(t, "cat") for t in odd] == ["a cat and a cat", "a cat in {braces}", "a cat {"]
    classifier = Classifier(model, ["cat", "dog"], templates=odd)  # str.format raised IndexError/KeyError/ValueError
    prompts = model.encode_text(["a dog and a dog", "a dog in {braces}", "a dog {"])
    prompts /= np.linalg.norm(prompts, axis=1, keepdims=True)
    mean = prompts.mean(axis=0)
    np.testing.assert_allclose(classifier.label_vectors[1], mean / np.linalg.norm(mean), atol=1e-5)


def test_classify_folder_cli_writes_one_row_per_image(tmp_path, tiny_bundle):
    folder = tmp_path / "photos"
    make_photos(folder, 5)
    (folder / "broken.jpg").write_bytes(b"nope")
    result = subprocess.run([*CLI, "classify", str(folder), "--labels", "cat,dog,car", "--model", str(tiny_bundle)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == ["path", "label", "probability", "cat", "dog", "car"]
    assert len(rows) == 6
    for row in rows[1:]:
        probs = [float(v) for v in row[3:]]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4) and row[1] == ["cat", "dog", "car"][int(np.argmax(probs))]
    assert "broken.jpg" in result.stderr

    as_json = subprocess.run([*CLI, "classify", str(folder), "--labels", "cat,dog", "--model", str(tiny_bundle), "--json"],
                             capture_output=True, text=True, timeout=120)
    payload = json.loads(as_json.stdout)
    assert isinstance(payload, list) and len(payload) == 5
    assert set(payload[0]) == {"path", "label", "probability", "probabilities"}
    # One image file: the single-image form, unless --rows asks for the per-image form a script expects.
    one = str(folder / "photo_000.png")
    single = json.loads(subprocess.run([*CLI, "classify", one, "--labels", "cat,dog", "--model", str(tiny_bundle),
                                        "--json"], capture_output=True, text=True, timeout=120).stdout)
    as_rows = json.loads(subprocess.run([*CLI, "classify", one, "--labels", "cat,dog", "--model", str(tiny_bundle),
                                         "--json", "--rows"], capture_output=True, text=True, timeout=120).stdout)
    assert isinstance(single, dict) and as_rows == [single]
    csv_rows = subprocess.run([*CLI, "classify", one, "--labels", "cat,dog", "--model", str(tiny_bundle), "--rows"],
                              capture_output=True, text=True, timeout=120).stdout
    assert list(csv.reader(io.StringIO(csv_rows)))[0] == ["path", "label", "probability", "cat", "dog"]
    raw = subprocess.run([*CLI, "classify", str(folder), "--labels", "cat,dog", "--model", str(tiny_bundle)],
                         capture_output=True, timeout=120).stdout
    assert raw.count(b"\n") > 2 and b"\r" not in raw  # Unix line ends: no \r on each last field for cut or awk
    # A label named like a column would make a header DictReader cannot read back: refused for CSV, fine in JSON.
    clash = subprocess.run([*CLI, "classify", str(folder), "--labels", "path,dog", "--model", str(tiny_bundle)],
                           capture_output=True, text=True, timeout=120)
    assert clash.returncode == 2 and "also a column of the CSV output" in clash.stderr
    named = subprocess.run([*CLI, "classify", str(folder), "--labels", "path,dog", "--model", str(tiny_bundle),
                            "--json"], capture_output=True, text=True, timeout=120)
    assert named.returncode == 0 and set(json.loads(named.stdout)[0]["probabilities"]) == {"path", "dog"}
    alone = subprocess.run([*CLI, "classify", one, "--labels", "path,dog", "--model", str(tiny_bundle)],
                           capture_output=True, text=True, timeout=120)  # label,probability rows: nothing clashes
    assert alone.returncode == 0 and {row[0] for row in csv.reader(io.StringIO(alone.stdout))} >= {"path", "dog"}


def test_classify_shows_progress_on_a_terminal_and_keeps_stdout_clean(tmp_path, tiny_bundle):
    from terminal_fixtures import popen_on_terminal, read_terminal

    folder = tmp_path / "photos"
    make_photos(folder, 20)
    # stderr is a terminal, stdout a pipe (e.g. into a CSV file)
    proc, master = popen_on_terminal([*CLI, "classify", str(folder), "--labels", "cat,dog", "--model",
                                      str(tiny_bundle)], "stderr", {**os.environ, "COLUMNS": "120", "TERM": "xterm"})
    terminal = read_terminal(master).decode(errors="replace")
    out = proc.stdout.read().decode()
    assert proc.wait(timeout=120) == 0
    assert "classifying" in terminal and "20/20" in terminal
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["path", "label", "probability", "cat", "dog"] and len(rows) == 21


def test_classify_with_a_collection_uses_its_model_and_stored_vectors(tmp_path, model):
    folder = tmp_path / "photos"
    make_photos(folder, 4)
    root = tmp_path / "idx"
    index_paths(Collection.create("c", root), model, [str(folder)], IndexOptions(workers=0))
    image = folder / "photo_000.png"
    result = subprocess.run([*CLI, "classify", str(image), "--labels", "cat,dog", "--collection", "c", "--index-dir",
                             str(root), "--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    expected = dict(classify(model, image, ["cat", "dog"]))
    assert payload["probabilities"] == pytest.approx(expected, abs=1e-4)
