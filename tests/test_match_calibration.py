"""The match probability's calibration (clipsearch/train/match_calibration.py): Platt scaling recovers a known
logistic relation from scored pairs, the reliability figures measure what they say, and model.json's entry is
written without touching anything else. How a calibrated bundle's searches report `match` is in test_rerank.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clipsearch.train.match_calibration import MatchCalibration, fit_platt, reliability, write_calibration


def test_platt_scaling_recovers_a_known_logistic_relation():
    rng = np.random.default_rng(0)
    scores = rng.normal(20.0, 8.0, 200_000)  # re-ranking scores live far from 0: the fit must not care
    truth = 1.0 / (1.0 + np.exp(-(0.3 * scores - 7.0)))
    labels = rng.random(len(scores)) < truth
    scale, bias = fit_platt(scores, labels)
    assert scale == pytest.approx(0.3, rel=0.03) and bias == pytest.approx(-7.0, rel=0.03)
    calibrated = 1.0 / (1.0 + np.exp(-(scale * scores + bias)))
    assert reliability(calibrated, labels).ece < 0.01
    with pytest.raises(ValueError, match="both matching and non-matching"):
        fit_platt(scores[:10], np.ones(10, dtype=bool))


def test_reliability_reports_the_gap_between_confidence_and_frequency():
    labels = np.array([True] * 2 + [False] * 8)
    perfect = reliability(np.full(10, 0.2), labels)  # says 20%, and 2 in 10 match
    assert (perfect.pairs, perfect.positives, perfect.ece) == (10, 2, 0.0)
    assert perfect.brier == pytest.approx((2 * 0.8 ** 2 + 8 * 0.2 ** 2) / 10, abs=1e-4)
    overconfident = reliability(np.full(10, 0.9), labels)  # says 90%, and 2 in 10 match
    assert overconfident.ece == pytest.approx(0.7, abs=1e-4)


def test_the_fit_is_written_into_the_itm_entry_and_nothing_else_changes(tmp_path):
    meta = {"name": "m", "itm": {"kind": "fusion", "itc_weight": 100.0}, "duplicates": {"threshold": 0.9}}
    (tmp_path / "model.json").write_text(json.dumps(meta), encoding="utf-8")
    fit = MatchCalibration(scale=0.2898, bias=-10.3981, fitted_on="validation", fit={}, k=32, seconds=1.0)
    write_calibration(tmp_path, fit)
    written = json.loads((tmp_path / "model.json").read_text(encoding="utf-8"))
    assert written["itm"]["calibration"]["scale"] == 0.2898 and written["itm"]["calibration"]["bias"] == -10.3981
    del written["itm"]["calibration"]
    assert written == meta and [p.name for p in tmp_path.iterdir()] == ["model.json"]  # no temporary file left
    (tmp_path / "model.json").write_text(json.dumps({"name": "no head"}), encoding="utf-8")
    with pytest.raises(ValueError, match="no ITM head"):
        write_calibration(tmp_path, fit)
