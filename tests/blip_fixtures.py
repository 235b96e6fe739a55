"""The tiny random BLIP retrieval model of the tests (no network): BLIP's tokenizer rebuilt from the vocabulary
the bundled emoji-mini ships, a tiny BlipConfig, saved with save_pretrained so the real loading path runs.
conftest.py exports it once per test session (fixtures `blip_source`, `blip_bundle`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

IMAGE_SIZE = 64
EMOJI_MINI_TOKENIZER = Path(__file__).resolve().parents[1] / "clipsearch" / "model" / "bundled" / "emoji-mini" / "tokenizer.json"


def blip_tokenizer():
    """BLIP's tokenizer as the hub ships it: BertTokenizer (lower case) + bos [DEC] + additional [ENC]."""
    import transformers

    vocab = json.loads(EMOJI_MINI_TOKENIZER.read_text(encoding="utf-8"))["model"]["vocab"]
    return transformers.BertTokenizer(vocab=dict(vocab), bos_token="[DEC]", additional_special_tokens=["[ENC]"])


def tiny_config(vocab_size: int):
    import transformers

    return transformers.BlipConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=512),
        # BlipVisionConfig's default initializer_range (1e-10) makes every random image look alike.
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=IMAGE_SIZE, patch_size=16, initializer_range=0.02),
        image_text_hidden_size=24,
    )


def spread_itm_logits(model, tokenizer) -> None:
    """A random tiny model's ITM logits barely depend on the input (the [CLS] state is nearly constant), so
    the parity test would compare saturated or constant probabilities: scale the head up and centre it so
    the match probability of the test pairs spreads across (0, 1)."""
    import torch

    texts = ["a dog on a beach", "a red car", "two cats on a sofa", "mountains at night"]
    pixels = torch.from_numpy(np.stack([np.random.default_rng(i).standard_normal((3, IMAGE_SIZE, IMAGE_SIZE))
                                        for i in range(len(texts))]).astype(np.float32))
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        model.itm_head.weight.normal_(0.0, 30.0)
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pixels).itm_score
        model.itm_head.bias.sub_(logits.mean(dim=0))


def save_tiny_blip(folder: Path):
    """Save the tiny random BLIP (model, tokenizer, image processor) to `folder`; returns (folder, model, tokenizer)."""
    import transformers

    from clipsearch.model.blip import random_blip

    tokenizer = blip_tokenizer()
    model = random_blip(tiny_config(len(tokenizer)), seed=0)
    spread_itm_logits(model, tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    transformers.BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(folder)
    return folder, model, tokenizer
