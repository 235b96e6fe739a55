"""Text → graph inputs with the bundle's own `tokenizer.json` (Hugging Face `tokenizers`, no torch).

For CLIP byte-level BPE bundles the ids equal open_clip's: the same cleaning (ftfy + HTML unescape +
whitespace folding + lower case), `<start_of_text>` … `<end_of_text>`, and truncation that keeps the
end-of-text token last. Batches are padded only to their longest member, never to the context length:
CLIP's causal mask makes the end-of-text token independent of anything after it, so padding would be
pure waste.

For bundles exported from an open_clip Hugging Face tokenizer (text.tokenizer "hf_open_clip") the ids equal
open_clip's `HFTokenizer`: its clean mode ("open_clip_whitespace" | "open_clip_lower" | "open_clip_canonicalize"),
the special tokens and truncation of tokenizer.json (as transformers applies them), padding to the context
length with the pad id, and model.json's "text_rules" "replace_ids" (open_clip's `strip_sep_token`).
"""

from __future__ import annotations

import html
import string
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer

from .bundle import BundleInfo, TextSpec
from ..errors import BundleError, QueryError


def open_clip_clean(text: str) -> str:
    """open_clip's `basic_clean` (ftfy, HTML entities twice, strip); whitespace/lower-case are in tokenizer.json."""
    import ftfy

    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


_PUNCTUATION = str.maketrans("", "", string.punctuation)


def immich_clean(text: str) -> str:
    """Immich's `clean_text`: runs of whitespace (Python's `str.split`) folded into one space, ends stripped."""
    return " ".join(text.split())


def immich_canonicalize(text: str) -> str:
    """Immich's `clean_text(canonicalize=True)`: whitespace folded, ASCII punctuation removed, lower case."""
    return immich_clean(text).translate(_PUNCTUATION).lower()


def open_clip_whitespace(text: str) -> str:
    """open_clip's `_clean_whitespace` (HFTokenizer's default): basic_clean, then whitespace folded."""
    return " ".join(open_clip_clean(text).split())


def open_clip_lower(text: str) -> str:
    """open_clip's `_clean_lower`: basic_clean, whitespace folded, lower case."""
    return open_clip_whitespace(text).lower()


def open_clip_canonicalize(text: str) -> str:
    """open_clip's `_clean_canonicalize`: basic_clean, then big_vision's canonicalize_text."""
    text = open_clip_clean(text).replace("_", " ").translate(_PUNCTUATION).lower()
    return " ".join(text.split())


# model.json "text.clean" -> the function applied before tokenizer.json ("none": the text as given)
CLEANERS = {"open_clip": open_clip_clean, "immich": immich_clean, "immich_canonicalize": immich_canonicalize,
            "open_clip_whitespace": open_clip_whitespace, "open_clip_lower": open_clip_lower,
            "open_clip_canonicalize": open_clip_canonicalize}


@dataclass(frozen=True)
class TokenBatch:
    """Graph inputs by name (int64 [batch, seq]) and the unpadded length of each row."""

    inputs: dict[str, np.ndarray]
    lengths: np.ndarray


def unknown_words_error(model_name: str, text: str, what: str = "") -> QueryError:
    """The error for a query text or label (`what`: e.g. "the label ") of which model `model_name`'s vocabulary
    knows no word (`TextTokenizer.knows_none_of`), with the hint to put it in words."""
    return QueryError(f"model {model_name} knows none of the words in {what}{text[:60]!r}",
                      "Describe it in words: its vocabulary has no emoji (e.g. 'red heart', not ❤️).")


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer, spec: TextSpec, context_length: int,
                 rules: dict | None = None) -> None:
        if spec.clean != "none" and spec.clean not in CLEANERS:
            raise BundleError(f"unknown text clean mode {spec.clean!r} in model.json",
                              "The bundle needs a newer clipsearch: pip install -U clipsearch")
        rules = dict(rules or {})
        self._tokenizer = tokenizer
        self._tokenizer.no_padding()
        if rules.get("truncation") == "tokenizer.json":
            # the truncation transformers applies for `max_length=context_length, truncation=True`
            self._tokenizer.enable_truncation(max_length=context_length, stride=0, strategy="longest_first",
                                              direction=str(rules.get("truncation_side", "right")))
        else:
            self._tokenizer.no_truncation()
        self._replace = {int(k): int(v) for k, v in (rules.get("replace_ids") or {}).items()}
        self.spec = spec
        self.context_length = context_length

    @classmethod
    def from_bundle(cls, info: BundleInfo) -> "TextTokenizer":
        rules = info.extra.get("text_rules")
        path = info.file("tokenizer.json")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises its own Exception for a file it cannot parse
            raise BundleError(f"{path} cannot be read as a tokenizer ({str(exc)[:200]})",
                              f"Export or download the bundle again; `clipsearch models info {info.path} --verify` "
                              "lists what differs.") from exc
        return cls(tokenizer, info.text, info.context_length, rules if isinstance(rules, dict) else None)

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, with start/end tokens and truncation to the context length."""
        clean = CLEANERS.get(self.spec.clean)
        cleaned = [clean(t) for t in texts] if clean is not None else list(texts)
        add_special = self.spec.bos_id is None  # WordPiece bundles let tokenizer.json add [CLS]/[SEP]
        encodings = self._tokenizer.encode_batch(cleaned, add_special_tokens=add_special)
        rows = []
        limit = self.context_length
        for encoding in encodings:
            ids = list(encoding.ids)
            if self.spec.bos_id is not None:
                ids = [self.spec.bos_id, *ids, self.spec.eos_id]
            if len(ids) > limit:
                last = ids[-1]
                ids = ids[:limit]
                ids[-1] = last  # the end token (CLIP's EOT or BERT's [SEP]) always survives truncation
            if self._replace:
                ids = [self._replace.get(t, t) for t in ids]
            rows.append(ids)
        return rows

    def knows_none_of(self, text: str) -> bool:
        """True when every token of `text` is the vocabulary's unknown token (e.g. emoji for a WordPiece
        vocabulary): its embedding then says nothing about the text. Byte-level BPE (CLIP) never has one."""
        unknown = getattr(self._tokenizer.model, "unk_token", None)
        unknown_id = self._tokenizer.token_to_id(unknown) if unknown else None
        if unknown_id is None:
            return False
        clean = CLEANERS.get(self.spec.clean)
        ids = self._tokenizer.encode(clean(text) if clean is not None else text, add_special_tokens=False).ids
        return bool(ids) and all(i == unknown_id for i in ids)

    def __call__(self, texts: Sequence[str]) -> TokenBatch:
        rows = self.token_ids(texts)
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        width = int(lengths.max()) if len(rows) else 1
        if self.spec.pad_to == "context":
            width = self.context_length
        pad_id = self._replace.get(self.spec.pad_id, self.spec.pad_id)  # open_clip replaces after padding
        ids = np.full((len(rows), width), pad_id, dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
        inputs = {"input_ids": ids}
        if "attention_mask" in self.spec.inputs:
            inputs["attention_mask"] = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
        if "token_type_ids" in self.spec.inputs:
            inputs["token_type_ids"] = np.zeros_like(ids)
        return TokenBatch(inputs=inputs, lengths=lengths)
