"""Batch rendering of RGBA sprites into model inputs, with augmentation that keeps meaning.

Allowed: scale, small rotation, translation, background colour (mostly white, as the runtime composites
transparency on white), brightness/contrast, resolution jitter. Never flips (arrows, hands, text) and never
hue shifts (a red heart stays red). Scenes place two sprites side by side or one above the other.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _affine(sprites: torch.Tensor, scale: torch.Tensor, angle: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor,
            size: int) -> torch.Tensor:
    """Place premultiplied RGBA sprites [B,4,S,S] on a size×size transparent canvas."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(len(sprites), 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos / scale, sin / scale
    theta[:, 1, 0], theta[:, 1, 1] = -sin / scale, cos / scale
    theta[:, 0, 2] = -(theta[:, 0, 0] * tx + theta[:, 0, 1] * ty)
    theta[:, 1, 2] = -(theta[:, 1, 0] * tx + theta[:, 1, 1] * ty)
    grid = F.affine_grid(theta, [len(sprites), 4, size, size], align_corners=False)
    return F.grid_sample(sprites, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _premultiplied(sprites_u8: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(sprites_u8)).permute(0, 3, 1, 2).float() / 255.0
    return torch.cat([x[:, :3] * x[:, 3:], x[:, 3:]], dim=1)


def _backgrounds(n: int, gen: torch.Generator, white_p: float) -> torch.Tensor:
    kind = torch.rand(n, generator=gen)
    bg = torch.ones(n, 3)
    gray = torch.rand(n, 1, generator=gen) * 0.8 + 0.1
    pastel = torch.rand(n, 3, generator=gen) * 0.3 + 0.7
    black = kind < (1 - white_p) * 0.25
    grey = (kind >= (1 - white_p) * 0.25) & (kind < (1 - white_p) * 0.6)
    past = (kind >= (1 - white_p) * 0.6) & (kind < (1 - white_p))
    bg[black] = 0.0
    bg[grey] = gray[grey].expand(-1, 3)
    bg[past] = pastel[past]
    return bg[:, :, None, None]


def composite_white(sprites_u8: np.ndarray) -> torch.Tensor:
    """Evaluation rendering: RGBA on white, as `preprocess.open_image` does. Returns [B,3,S,S] in 0..1."""
    x = _premultiplied(sprites_u8)
    return x[:, :3] + (1 - x[:, 3:])


def render_batch(singles_u8: np.ndarray, scene_a_u8: np.ndarray, scene_b_u8: np.ndarray, layouts: np.ndarray,
                 size: int, gen: torch.Generator, white_p: float = 0.7) -> torch.Tensor:
    """Augmented training images [B,3,size,size] in 0..1: singles first, then scenes."""
    layers = []
    n1 = len(singles_u8)
    if n1:
        s = torch.empty(n1).uniform_(0.7, 1.0, generator=gen)
        angle = torch.empty(n1).uniform_(-12, 12, generator=gen) * math.pi / 180
        tx = (torch.rand(n1, generator=gen) * 2 - 1) * (1 - s) * 0.9
        ty = (torch.rand(n1, generator=gen) * 2 - 1) * (1 - s) * 0.9
        layers.append(_affine(_premultiplied(singles_u8), s, angle, tx, ty, size))
    n2 = len(scene_a_u8)
    if n2:
        lay = torch.from_numpy(np.asarray(layouts)).bool()
        s = torch.empty(n2).uniform_(0.42, 0.52, generator=gen)
        angle = torch.empty(n2).uniform_(-8, 8, generator=gen) * math.pi / 180
        along = 0.5 + torch.empty(n2).uniform_(-0.06, 0.06, generator=gen)
        across = torch.empty(n2).uniform_(-0.3, 0.3, generator=gen)
        across_b = across + torch.empty(n2).uniform_(-0.1, 0.1, generator=gen)
        # layout 0 (A left of B): x = -along / +along; layout 1 (A above B): y = -along / +along
        ax = torch.where(lay, across, -along)
        ay = torch.where(lay, -along, across)
        bx = torch.where(lay, across_b, along)
        by = torch.where(lay, along, across_b)
        a = _affine(_premultiplied(scene_a_u8), s, angle, ax, ay, size)
        s2 = s * torch.empty(n2).uniform_(0.9, 1.1, generator=gen)
        b = _affine(_premultiplied(scene_b_u8), s2, -angle, bx, by, size)
        layers.append(b + a * (1 - b[:, 3:]))
    x = torch.cat(layers)
    bg = _backgrounds(len(x), gen, white_p)
    rgb = x[:, :3] + (1 - x[:, 3:]) * bg
    # brightness / contrast jitter (no hue change)
    bright = torch.empty(len(x), 1, 1, 1).uniform_(0.9, 1.1, generator=gen)
    contrast = torch.empty(len(x), 1, 1, 1).uniform_(0.85, 1.15, generator=gen)
    mean = rgb.mean(dim=(1, 2, 3), keepdim=True)
    rgb = ((rgb - mean) * contrast + mean) * bright
    # resolution jitter: a third of the batch goes through a smaller size and back
    low = torch.rand(len(x), generator=gen) < 0.33
    if low.any():
        small = int(size * 0.7)
        sub = F.interpolate(rgb[low], size=(small, small), mode="bilinear", antialias=True, align_corners=False)
        rgb[low] = F.interpolate(sub, size=(size, size), mode="bilinear", align_corners=False)
    return rgb.clamp(0, 1)
