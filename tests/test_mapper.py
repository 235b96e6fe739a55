"""The indexer's mapper (indexer/pipeline.py `Mapper`): decoded uint8 images become the visual graph's float input
with the model's mean and std, bit for bit as the arithmetic x * (1 / (255 std)) - mean / std gives it, whichever
path it takes."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from clipsearch.indexer.pipeline import Mapper
from clipsearch.model.bundle import PreprocessSpec

SPECS = [PreprocessSpec(),  # open_clip's mean and std
         PreprocessSpec(size=(32, 48), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
         PreprocessSpec(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))]


def arithmetic(images: list[np.ndarray], spec: PreprocessSpec) -> np.ndarray:
    std = np.asarray(spec.std, dtype=np.float32)
    batch = np.stack(images).astype(np.float32)
    batch *= (1.0 / (255.0 * std)).reshape(1, 1, 1, 3)
    batch -= (np.asarray(spec.mean, dtype=np.float32) / std).reshape(1, 1, 1, 3)
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))


@pytest.mark.parametrize("spec", SPECS)
def test_uint8_images_normalise_to_the_same_bits_as_the_arithmetic(spec):
    h, w = spec.size
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(5)]
    images[0][0, 0] = (0, 255, 128)  # both ends of the range in every channel
    images[1][:] = 255
    mapper = Mapper(SimpleNamespace(preprocess=spec))
    got = mapper.normalise(images)
    assert got.dtype == np.float32 and got.shape == (5, 3, h, w) and got.flags.c_contiguous
    assert np.array_equal(got, arithmetic(images, spec))
    for channel in range(3):  # white is (1 - mean) / std, black is -mean / std
        assert np.isclose(got[1, channel, 0, 0], (1 - spec.mean[channel]) / spec.std[channel], atol=1e-5)
    assert np.isclose(got[0, 0, 0, 0], -spec.mean[0] / spec.std[0], atol=1e-5)


def test_read_only_images_from_the_decoders_and_other_inputs_take_a_path_that_gives_the_same_values():
    spec = SPECS[0]
    h, w = spec.size
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    # The decoder processes hand over bytes: the reader wraps them read-only, as np.frombuffer does.
    from_bytes = np.frombuffer(raw.tobytes(), dtype=np.uint8).reshape(h, w, 3)
    mapper = Mapper(SimpleNamespace(preprocess=spec))
    assert np.array_equal(mapper.normalise([from_bytes, raw]), arithmetic([raw, raw], spec))
    as_float = [raw.astype(np.float32)]  # not uint8: the pixel-by-pixel arithmetic
    assert np.array_equal(mapper.normalise(as_float), arithmetic(as_float, spec))
    with pytest.raises(ValueError):  # images of different sizes cannot form one batch, whichever the path
        mapper.normalise([raw, raw[:-1]])
