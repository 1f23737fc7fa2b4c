"""The CLIP tokenizer: prompts -> token ids [B, 77].

    tok = Tokenizer.from_dir("sd-v1-4/tokenizer")  # vocab.json + merges.txt (+ tokenizer_config.json ...)
    ids = tok(["a photo of an astronaut", ""])        # LongTensor [2, 77]

Wraps transformers' ``CLIPTokenizer`` (byte-level BPE). Every row is BOS, the prompt's tokens, EOS, then
padding up to ``max_length`` (77); prompts that are too long are truncated and keep their EOS. The pad
token is what the tokenizer files say: SD 1.x's tokenizer pads with ``<|endoftext|>``, SD 2.x's with
``!`` (id 0). When the files do not say (a bare vocab.json + merges.txt), the caller passes the
family's pad token.

:meth:`Tokenizer.fallback` needs no files: a deterministic word-hash tokenizer for ``random:``
weights only, whose images are noise anyway. It is not CLIP's tokenization and must never be used with
real weights.
"""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import torch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77
REQUIRED_FILES = ("vocab.json", "merges.txt")


def has_tokenizer_files(path: str | Path) -> bool:
    """True when ``path`` is a folder holding vocab.json and merges.txt."""
    p = Path(path)
    return p.is_dir() and all((p / f).is_file() for f in REQUIRED_FILES)


def _pad_token_in_files(path: Path) -> str | None:
    """The pad token named by tokenizer_config.json / special_tokens_map.json, if any."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        f = path / name
        if not f.is_file():
            continue
        try:
            pad = json.loads(f.read_text()).get("pad_token")
        except (json.JSONDecodeError, OSError, AttributeError):
            continue
        if isinstance(pad, dict):  # {"content": "!", "lstrip": false, ...}
            pad = pad.get("content")
        if isinstance(pad, str):
            return pad
    return None


class Tokenizer:
    """``__call__(prompts) -> LongTensor [B, max_length]``; ids of BOS/EOS/pad as attributes."""

    def __init__(
        self, backend: object | None, bos_id: int, eos_id: int, pad_id: int, vocab_size: int, max_length: int
    ) -> None:
        self._backend = backend  # a transformers CLIPTokenizer, or None for the fallback
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos_id, eos_id, pad_id
        self.vocab_size, self.max_length = vocab_size, max_length
        self.source = "fallback" if backend is None else "files"

    @classmethod
    def from_dir(cls, path: str | Path, pad_token: str | None = None, max_length: int = MAX_LENGTH) -> Tokenizer:
        """Load vocab.json + merges.txt from ``path``.

        ``pad_token`` is used only when the folder's json files name none (SD 1.x: ``<|endoftext|>``,
        SD 2.x: ``!``). Raises FileNotFoundError when a required file is missing, ValueError when the
        files do not hold a CLIP vocabulary.
        """
        from transformers import CLIPTokenizer

        p = Path(path)
        missing = [f for f in REQUIRED_FILES if not (p / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{p}: missing tokenizer file(s) {', '.join(missing)}")
        pad = _pad_token_in_files(p) or pad_token or EOS
        try:
            backend = CLIPTokenizer.from_pretrained(str(p), pad_token=pad, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - transformers raises many types for bad files
            raise ValueError(f"{p}: cannot load a CLIP tokenizer: {type(e).__name__}: {e}") from e
        vocab = backend.get_vocab()
        for tok in (BOS, EOS, pad):
            if tok not in vocab:
                raise ValueError(f"{p}: token {tok!r} is not in vocab.json")
        return cls(backend, vocab[BOS], vocab[EOS], vocab[pad], len(vocab), max_length)

    @classmethod
    def fallback(cls, vocab_size: int = 49408, pad_id: int | None = None, max_length: int = MAX_LENGTH) -> Tokenizer:
        """Deterministic stand-in for ``random:`` weights: lowercased words hashed into the vocabulary.

        BOS/EOS are the last two ids (as in CLIP: 49406/49407); pads with EOS unless ``pad_id``.
        """
        if vocab_size < 4:
            raise ValueError(f"vocab_size must be >= 4, got {vocab_size}")
        bos, eos = vocab_size - 2, vocab_size - 1
        return cls(None, bos, eos, eos if pad_id is None else pad_id, vocab_size, max_length)

    def _encode_fallback(self, prompt: str) -> list[int]:
        words = re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", prompt.lower())
        n = self.vocab_size - 2  # ids 0 .. vocab-3 are "words"
        return [zlib.crc32(w.encode()) % n for w in words]

    def __call__(self, prompts: list[str] | str) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        if self._backend is not None:
            enc = self._backend(
                list(prompts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
            )
            return enc["input_ids"].long()  # [B, max_length]
        rows = []
        for prompt in prompts:
            ids = [self.bos_token_id, *self._encode_fallback(prompt)[: self.max_length - 2], self.eos_token_id]
            rows.append(ids + [self.pad_token_id] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)  # [B, max_length]

    def __repr__(self) -> str:
        return f"Tokenizer({self.source}, vocab={self.vocab_size}, pad={self.pad_token_id}, len={self.max_length})"
