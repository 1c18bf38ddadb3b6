"""CLIP's byte-level BPE tokenizer with the ids of the published IRRA/PHP checkpoints, and MLM masking.

The vocabulary is built from the BPE file shipped inside open_clip: 256 byte tokens, the same 256 bytes with the
end-of-word marker `</w>`, the merges in file order, then three special tokens. The published checkpoints drop
the last merge open_clip uses (`jeky ll</w>`), so its slot 49405 holds `<|mask|>`; `<|startoftext|>` = 49406 and
`<|endoftext|>` = 49407. Every id below 49405 is therefore the same token string as in open_clip.

Two departures from the reference tokenizer, both deliberate:
- the dropped merge is not in the ranks, so a word that would need it keeps the merge's two pieces instead of
  failing with a KeyError (the reference fails on "jekyll");
- the special strings written inside a caption are ordinary text, so a query cannot end itself early.
"""
from __future__ import annotations

import gzip
from functools import lru_cache
from typing import Dict, List, Sequence, Tuple, Union

import regex
import torch
from open_clip.tokenizer import basic_clean, bytes_to_unicode, default_bpe, get_pairs, whitespace_clean

from utils.errors import UserError

MASK_ID = 49405
SOT_ID = 49406
EOT_ID = 49407
VOCAB_SIZE = 49408

_NUM_MERGES = VOCAB_SIZE - 512 - 3  # 48,893: open_clip's 48,894 minus the dropped last one
_SPECIALS = ("<|mask|>", "<|startoftext|>", "<|endoftext|>")
# open_clip's word pattern without its special-token alternatives (rule (b) above).
_WORD_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)


class _Vocab:
    """Encoder/decoder tables and merge ranks, built once per process."""

    def __init__(self) -> None:
        lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
        # Line 0 is the file's version header; the merges used are the next 48,893 lines.
        merges = [tuple(line.split()) for line in lines[1:1 + _NUM_MERGES]]
        self.dropped_merge: Tuple[str, str] = tuple(lines[1 + _NUM_MERGES].split())
        self.byte_encoder: Dict[int, str] = bytes_to_unicode()
        self.byte_decoder: Dict[str, int] = {v: k for k, v in self.byte_encoder.items()}
        tokens = list(self.byte_encoder.values())
        tokens += [t + "</w>" for t in tokens]
        tokens += ["".join(m) for m in merges]
        tokens += list(_SPECIALS)
        assert len(tokens) == VOCAB_SIZE and tokens[MASK_ID] == "<|mask|>"
        self.decoder: List[str] = tokens
        self.encoder: Dict[str, int] = {t: i for i, t in enumerate(tokens) if i < MASK_ID}
        self.ranks: Dict[Tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
        self.cache: Dict[str, List[int]] = {}

    def bpe(self, word: str) -> List[int]:
        """Ids of one pre-tokenised word of the cleaned text (cached per word)."""
        cached = self.cache.get(word)
        if cached is not None:
            return cached
        chars = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
        parts: Tuple[str, ...] = tuple(chars[:-1]) + (chars[-1] + "</w>",)
        while len(parts) > 1:
            pairs = get_pairs(parts)
            best = min(pairs, key=lambda p: self.ranks.get(p, _NO_RANK))
            if best not in self.ranks:
                break
            first, second = best
            merged: List[str] = []
            i = 0
            while i < len(parts):
                if i < len(parts) - 1 and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = tuple(merged)
        ids = [self.encoder[p] for p in parts]
        self.cache[word] = ids
        return ids

    def encode(self, text: str) -> List[int]:
        """Token ids of `text` without SOT/EOT."""
        text = whitespace_clean(basic_clean(text)).lower()
        ids: List[int] = []
        for word in _WORD_PATTERN.findall(text):
            ids.extend(self.bpe(word))
        return ids


_NO_RANK = float("inf")


@lru_cache(maxsize=1)
def vocab() -> _Vocab:
    """The process-wide vocabulary (built on first use, about a second)."""
    return _Vocab()


def encode(text: str) -> List[int]:
    """BPE ids of one caption after cleaning, without SOT/EOT or padding."""
    return vocab().encode(text)


def tokenize(texts: Union[str, Sequence[str]], context_length: int = 77, truncate: bool = True) -> torch.Tensor:
    """Tokenise captions into a LongTensor [N, context_length]: SOT + tokens + EOT, padded with 0.

    A caption longer than the context is cut and its last position set to EOT; with `truncate=False` it raises
    UserError naming the caption instead. A single string gives N = 1.
    """
    if isinstance(texts, str):
        texts = [texts]
    rows: List[List[int]] = []
    for text in texts:
        ids = [SOT_ID] + encode(text) + [EOT_ID]
        if len(ids) > context_length:
            if not truncate:
                short = text if len(text) <= 60 else text[:57] + "..."
                raise UserError(f"caption {short!r} has {len(ids)} tokens, more than the context length "
                                f"{context_length}; shorten it or allow truncation")
            ids = ids[:context_length]
            ids[-1] = EOT_ID
        rows.append(ids + [0] * (context_length - len(ids)))
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), context_length)


def decode(ids: Union[torch.Tensor, Sequence[int]]) -> str:
    """Text of a 1-D id sequence: stops at the first EOT and skips SOT.

    Id 0 is both padding and the token "!" (as in the reference); zeros before an EOT are read as "!", trailing
    zeros of a sequence without EOT as padding.
    """
    seq = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
    if EOT_ID in seq:
        seq = seq[:seq.index(EOT_ID)]
    else:
        while seq and seq[-1] == 0:
            seq.pop()
    v = vocab()
    out = bytearray()
    for i in seq:
        if i == SOT_ID:
            continue
        if not 0 <= i < VOCAB_SIZE:
            raise ValueError(f"token id {i} is outside the vocabulary [0, {VOCAB_SIZE})")
        if i == MASK_ID:
            out += b" <|mask|> "
            continue
        token = v.decoder[i]
        end_of_word = token.endswith("</w>")
        out += bytes(v.byte_decoder[c] for c in (token[:-4] if end_of_word else token))
        if end_of_word:
            out += b" "
    return " ".join(out.decode("utf-8", errors="replace").split())
