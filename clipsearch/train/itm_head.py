"""The fusion ITM head (ALBEF/BLIP style) over a frozen dual encoder, in torch (training and export only).

Two parts, exported to two graphs:

* `ImageTokenizer` turns the image tower's last feature map [B, C, H, W] and its embedding [B, E] into
  T = 1 + H·W tokens of the head's width (one global token from the embedding, then the grid row by row,
  with a learned position for each cell), layer-normalised. It is grafted onto visual.onnx, so the indexer
  gets the embedding and the tokens from one call of the graph and stores the tokens (int8 + a scale per
  token: training sees that rounding too, see `fake_int8`).
* `FusionItm` reads the text tower's last hidden states [B, L, Dt] with their attention mask and the image
  tokens: `layers` pre-norm blocks of self-attention over the text, cross-attention from the text to the
  image tokens, and an MLP; the first text position ([CLS]) goes to a 2-way head (0 = no match, 1 = match).
  It is itm.onnx.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ItmHeadConfig:
    text_width: int = 384  # the text tower's hidden size
    grid_width: int = 192  # channels of the image tower's last feature map
    grid_tokens: int = 9  # H·W of that feature map
    embed_dim: int = 384  # the dual encoder's embedding size
    width: int = 192
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 2

    @property
    def image_tokens(self) -> int:
        return 1 + self.grid_tokens

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "ItmHeadConfig":
        return cls(**{k: int(v) for k, v in raw.items() if k in cls.__dataclass_fields__})


def fake_int8(tokens: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 rounding per token (as the index stores them), with a straight-through gradient."""
    scale = tokens.detach().abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127.0
    rounded = torch.round(tokens / scale).clamp(-127, 127) * scale
    return tokens + (rounded - tokens).detach()


class ImageTokenizer(nn.Module):
    def __init__(self, cfg: ItmHeadConfig) -> None:
        super().__init__()
        self.grid = nn.Linear(cfg.grid_width, cfg.width)
        self.glob = nn.Linear(cfg.embed_dim, cfg.width)
        self.pos = nn.Parameter(torch.randn(cfg.image_tokens, cfg.width) * 0.02)
        self.norm = nn.LayerNorm(cfg.width)

    def forward(self, feature_map: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        grid = self.grid(feature_map.flatten(2).transpose(1, 2))  # [B, H·W, width]
        tokens = torch.cat([self.glob(embeds)[:, None, :], grid], dim=1) + self.pos
        return self.norm(tokens)


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        b, n, w = x.shape
        h, d = self.heads, w // self.heads
        q = self.q(x).view(b, n, h, d).transpose(1, 2)
        kv = self.kv(context).view(b, context.shape[1], 2, h, d).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        if bias is not None:
            scores = scores + bias
        return self.out((scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, w))


class _FusionLayer(nn.Module):
    def __init__(self, cfg: ItmHeadConfig) -> None:
        super().__init__()
        w = cfg.width
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(w), nn.LayerNorm(w), nn.LayerNorm(w)
        self.self_attn = _Attention(w, cfg.heads)
        self.cross_attn = _Attention(w, cfg.heads)
        self.mlp = nn.Sequential(nn.Linear(w, w * cfg.mlp_ratio), nn.GELU(), nn.Linear(w * cfg.mlp_ratio, w))

    def forward(self, x: torch.Tensor, text_bias: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.self_attn(y, y, text_bias)
        x = x + self.cross_attn(self.norm2(x), image, None)
        return x + self.mlp(self.norm3(x))


class FusionItm(nn.Module):
    def __init__(self, cfg: ItmHeadConfig) -> None:
        super().__init__()
        self.text_in = nn.Linear(cfg.text_width, cfg.width)
        self.text_norm = nn.LayerNorm(cfg.width)
        self.layers = nn.ModuleList(_FusionLayer(cfg) for _ in range(cfg.layers))
        self.final_norm = nn.LayerNorm(cfg.width)
        self.classify = nn.Sequential(nn.Linear(cfg.width, cfg.width), nn.GELU(), nn.Linear(cfg.width, 2))

    def forward(self, text_tokens: torch.Tensor, attention_mask: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        x = self.text_norm(self.text_in(text_tokens))
        bias = (1.0 - attention_mask.to(x.dtype))[:, None, None, :] * -1e4  # padded text positions ignored
        for layer in self.layers:
            x = layer(x, bias, image_tokens)
        return self.classify(self.final_norm(x[:, 0]))


class ItmHead(nn.Module):
    """Both parts, as trained: feature map + embedding + text states -> ITM logits [B, 2].

    With a `branch` (a trainable copy of the tower's trunk, see itm_branch.py) the image side reads normalised
    pixels instead of the frozen tower's feature map: `image_tokens(pixels, embeds)`."""

    def __init__(self, cfg: ItmHeadConfig, branch: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.branch = branch
        self.tokenizer = ImageTokenizer(cfg)
        self.fusion = FusionItm(cfg)

    def image_tokens(self, image: torch.Tensor, embeds: torch.Tensor, quantise: bool = True) -> torch.Tensor:
        """`image`: the tower's feature map, or the normalised pixels when the head has its own branch."""
        tokens = self.tokenizer(self.branch(image) if self.branch is not None else image, embeds)
        return fake_int8(tokens) if quantise else tokens

    def forward(self, text_tokens: torch.Tensor, attention_mask: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        return self.fusion(text_tokens, attention_mask, image_tokens)

