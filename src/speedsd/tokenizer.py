"""The CLIP tokenizer: prompts -> token ids [B, 77] (or [B, k·77]: k chunks of a long prompt).

    tok = Tokenizer.from_dir("sd-v1-4/tokenizer")  # vocab.json + merges.txt (+ tokenizer_config.json ...)
    ids = tok(["a photo of an astronaut", ""])        # LongTensor [2, 77]
    ids = tok([long_prompt, ""], chunks=2)            # LongTensor [2, 154]: tokens 0-74 and 75-149

Our own byte-level BPE, id for id what transformers' (5.x) ``CLIPTokenizer`` gives on the same files
(tests/test_tokenizer.py compares them); no transformers at runtime. A row is BOS, the prompt's tokens,
EOS, then padding up to ``max_length`` (77); a prompt that is too long is truncated and keeps its EOS.
With ``chunks=k`` a row is k such blocks side by side, block j holding tokens [75j, 75j + 75) (an
empty block is BOS, EOS, padding): each block is encoded on its own and the embeddings are
concatenated, as AUTOMATIC1111's web UI reads prompts past 75 tokens.
The pad token is what the files say: SD 1.x pads with ``<|endoftext|>``, SD 2.x with ``!`` (id 0);
for a bare vocab.json + merges.txt the caller passes the family's. A prompt, step by step:

1. special tokens (BOS, EOS, pad) are cut out of the raw text with their own ids; those the json
   files mark ``"normalized": true`` are looked for after step 2 instead;
2. normalise: NFC, then lowercase one character at a time (no final-sigma rule);
3. split into words: the literal ``<|startoftext|>`` / ``<|endoftext|>`` (then split again into
   ``<|``, the word, ``|>``), a contraction ``'s 't 're 've 'm 'll 'd``, a run of letters (Unicode
   category L*), one digit (N*), or a run of anything else but whitespace, which is dropped;
4. a word's UTF-8 bytes become printable symbols, the last one marked ``</w>``; the adjacent pair
   with the lowest merges.txt rank is merged until no pair is in merges.txt.

Not done: ftfy / html unescaping (OpenAI's original), tokens added besides BOS/EOS/pad. Merges are
taken to be in trained order (none uses a later one's result), as in every CLIP merges.txt.

:meth:`Tokenizer.fallback` needs no files: a deterministic word-hash tokenizer for ``random:``
weights only, whose images are noise anyway. It is not CLIP's tokenization and must never be used with
real weights.
"""

from __future__ import annotations

import gc
import json
import re
import unicodedata
import zlib
from pathlib import Path

import torch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77
REQUIRED_FILES = ("vocab.json", "merges.txt")
WORD_END = "</w>"
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
# Unicode White_Space (what \s matches in the reference's regex engine); not str.isspace(): \x1c-\x1f.
_SPACE = frozenset("\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000" + "".join(map(chr, range(0x2000, 0x200B))))
_CACHE_MAX = 1 << 16  # words kept per tokenizer; the cache is emptied when full


def _byte_symbols() -> tuple[str, ...]:
    """Byte -> symbol: printable Latin-1 bytes stand for themselves, the other 68 get chr(256 + n) in order."""
    keep = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    spare = iter(range(256, 512))
    return tuple(chr(b) if b in keep else chr(next(spare)) for b in range(256))


_BYTE_SYMBOL = _byte_symbols()


def _kind(ch: str) -> str:
    """'L' letter, 'N' number, ' ' whitespace, '.' anything else."""
    if ch in _SPACE:
        return " "
    cat = unicodedata.category(ch)[0]
    return cat if cat in "LN" else "."


def split_words(text: str) -> list[str]:
    """Pre-tokenise normalised text into words (step 3 of the module docstring)."""
    words, i, n = [], 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "<" and (text.startswith(BOS, i) or text.startswith(EOS, i)):
            lit = BOS if text.startswith(BOS, i) else EOS
            words += ["<|", lit[2:-2], "|>"]
            i += len(lit)
            continue
        if ch == "'":
            c = next((c for c in _CONTRACTIONS if text.startswith(c, i)), None)
            if c is not None:
                words.append(c)
                i += len(c)
                continue
        kind = _kind(ch)
        j = i + 1
        if kind in "L.":  # a run of the same kind; a number is one digit
            while j < n and _kind(text[j]) == kind:
                j += 1
        if kind != " ":
            words.append(text[i:j])
        i = j
    return words


def normalize(text: str) -> str:
    """NFC, then per-character lowercase (``str.lower`` would turn a word-final capital sigma into ς)."""
    return "".join(map(str.lower, unicodedata.normalize("NFC", text)))


def _read_json(f: Path) -> dict:
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, OSError, UnicodeDecodeError):
        return {}
    return d if isinstance(d, dict) else {}


def has_tokenizer_files(path: str | Path) -> bool:
    """True when ``path`` is a folder holding vocab.json and merges.txt."""
    p = Path(path)
    return p.is_dir() and all((p / f).is_file() for f in REQUIRED_FILES)


def _pad_token_in_files(path: Path) -> str | None:
    """The pad token named by tokenizer_config.json / special_tokens_map.json, if any."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        pad = _read_json(path / name).get("pad_token")
        if isinstance(pad, dict):  # {"content": "!", "lstrip": false, ...}
            pad = pad.get("content")
        if isinstance(pad, str):
            return pad
    return None


def _normalized_specials(path: Path, pad: str) -> set[str]:
    """Special tokens the files mark ``"normalized": true`` (matched after lowercasing), as transformers
    reads them: the tokens of ``added_tokens_decoder`` as listed; else the roles bos, eos, unk, pad in
    that order (special_tokens_map.json over tokenizer_config.json), a role equal to an earlier one
    skipped, and the last role naming a token deciding (a plain string means false)."""
    cfg, smap = _read_json(path / "tokenizer_config.json"), _read_json(path / "special_tokens_map.json")
    flags: dict[str, bool] = {}
    decoder = cfg.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        for t in decoder.values():
            if isinstance(t, dict) and isinstance(t.get("content"), str):
                flags[t["content"]] = bool(t.get("normalized", not t.get("special", False)))
    roles = cfg if isinstance(decoder, dict) else {**cfg, **smap}
    listed, fixed = [], set(flags)
    for role, default in (("bos_token", BOS), ("eos_token", EOS), ("unk_token", EOS), ("pad_token", pad)):
        tok = roles.get(role) or default
        key = (tok.get("content"), bool(tok.get("normalized", False))) if isinstance(tok, dict) else tok
        if key in listed:
            continue
        listed.append(key)
        content, normalized = key if isinstance(key, tuple) else (key, False)
        if content not in fixed:
            flags[content] = normalized
    return {t for t, on in flags.items() if on}


def _special_pattern(tokens: set[str]) -> re.Pattern[str] | None:
    """Leftmost-longest match of any of ``tokens`` (longest first in the alternation)."""
    if not tokens:
        return None
    return re.compile("(" + "|".join(map(re.escape, sorted(tokens, key=len, reverse=True))) + ")")


def _load_vocab(path: Path) -> dict[str, int]:
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid json: {e}") from e
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise ValueError(f"{path}: not a {{token: id}} object")
    return vocab


def _load_merges(path: Path, vocab: dict[str, int]) -> dict[tuple[str, str], int]:
    """merges.txt -> {(left, right): rank}; every merge's parts and result must be in the vocabulary."""
    lines = [line.removesuffix("\r") for line in path.read_text(encoding="utf-8").split("\n")]
    if lines and not lines[-1]:
        lines.pop()
    pairs = [tuple(line.split(" ")) for line in lines if not line.startswith("#version")]
    if any(len(pair) != 2 for pair in pairs):
        line = " ".join(next(pair for pair in pairs if len(pair) != 2))
        raise ValueError(f"{path}: not a merge 'left right': {line[:80]!r}")
    made = {a + b for a, b in pairs}
    if not vocab.keys() >= made.union(*zip(*pairs)):  # one set test, then find the culprit
        a, b = next((a, b) for a, b in pairs if not (a in vocab and b in vocab and a + b in vocab))
        raise ValueError(f"{path}: merge {a + ' ' + b!r} uses or makes a token not in vocab.json")
    return dict(zip(pairs, range(len(pairs))))  # a repeated merge keeps its last rank, as in the oracle


class Tokenizer:
    """``__call__(prompts) -> LongTensor [B, max_length]``; ids of BOS/EOS/pad as attributes."""

    def __init__(
        self,
        bos_id: int,
        eos_id: int,
        pad_id: int,
        vocab_size: int,
        max_length: int,
        vocab: dict[str, int] | None = None,
        ranks: dict[tuple[str, str], int] | None = None,
        specials: dict[str, bool] | None = None,
    ) -> None:
        """``vocab``/``ranks`` None: the fallback. ``specials``: token -> matched after normalising?"""
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos_id, eos_id, pad_id
        self.vocab_size, self.max_length = vocab_size, max_length
        self.source = "fallback" if vocab is None else "files"
        self._vocab, self._ranks = vocab or {}, ranks or {}
        specials = specials or {}
        self._raw_specials = _special_pattern({t for t, norm in specials.items() if not norm})
        self._norm_specials = _special_pattern({t for t, norm in specials.items() if norm})
        self._cache: dict[str, tuple[int, ...]] = {}

    @classmethod
    def from_dir(cls, path: str | Path, pad_token: str | None = None, max_length: int = MAX_LENGTH) -> Tokenizer:
        """Load vocab.json + merges.txt from ``path``.

        ``pad_token`` is used only when the folder's json files name none (SD 1.x: ``<|endoftext|>``,
        SD 2.x: ``!``). Raises FileNotFoundError when a required file is missing, ValueError when the
        files do not hold a CLIP vocabulary.
        """
        p = Path(path)
        missing = [f for f in REQUIRED_FILES if not (p / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{p}: missing tokenizer file(s) {', '.join(missing)}")
        pad = _pad_token_in_files(p) or pad_token or EOS
        gc_on = gc.isenabled()
        gc.disable()  # ~150k new small objects: GC passes over torch's heap would double the load time
        try:
            vocab = _load_vocab(p / "vocab.json")
            for tok in (BOS, EOS, pad):
                if tok not in vocab:
                    raise ValueError(f"{p}: token {tok!r} is not in vocab.json")
            ranks = _load_merges(p / "merges.txt", vocab)
        except UnicodeDecodeError as e:
            raise ValueError(f"{p}: tokenizer files are not UTF-8: {e}") from e
        finally:
            if gc_on:
                gc.enable()
        normed = _normalized_specials(p, pad)
        specials = {t: t in normed for t in (BOS, EOS, pad)}
        return cls(vocab[BOS], vocab[EOS], vocab[pad], len(vocab), max_length, vocab, ranks, specials)

    @classmethod
    def fallback(cls, vocab_size: int = 49408, pad_id: int | None = None, max_length: int = MAX_LENGTH) -> Tokenizer:
        """Deterministic stand-in for ``random:`` weights: lowercased words hashed into the vocabulary.

        BOS/EOS are the last two ids (as in CLIP: 49406/49407); pads with EOS unless ``pad_id``.
        """
        if vocab_size < 4:
            raise ValueError(f"vocab_size must be >= 4, got {vocab_size}")
        bos, eos = vocab_size - 2, vocab_size - 1
        return cls(bos, eos, eos if pad_id is None else pad_id, vocab_size, max_length)

    def _encode_fallback(self, prompt: str) -> list[int]:
        words = re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", prompt.lower())
        n = self.vocab_size - 2  # ids 0 .. vocab-3 are "words"
        return [zlib.crc32(w.encode()) % n for w in words]

    def _bpe(self, word: str) -> tuple[int, ...]:
        """One word -> its token ids (step 4 of the module docstring), cached."""
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        syms = [_BYTE_SYMBOL[b] for b in word.encode("utf-8", "surrogatepass")]
        syms[-1] += WORD_END
        ranks, never = self._ranks, len(self._ranks)
        while len(syms) > 1:
            rank, k = min((ranks.get(pair, never), k) for k, pair in enumerate(zip(syms, syms[1:])))
            if rank == never:
                break
            left, right = syms[k], syms[k + 1]
            merged = syms[:k]
            while k < len(syms):  # every occurrence of the pair, left to right
                if k + 1 < len(syms) and syms[k] == left and syms[k + 1] == right:
                    merged.append(left + right)
                    k += 2
                else:
                    merged.append(syms[k])
                    k += 1
            syms = merged
        unk = self.eos_token_id  # CLIP's unk token is EOS
        ids = tuple(self._vocab.get(s, unk) for s in syms)
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[word] = ids
        return ids

    def _split_specials(self, text: str, pattern: re.Pattern[str] | None) -> list[str | int]:
        """Text pieces and the ids of the special tokens between them."""
        if pattern is None:
            return [text]
        parts = pattern.split(text)  # [text, token, text, token, ...]
        return [self._vocab[s] if k % 2 else s for k, s in enumerate(parts) if k % 2 or s]

    def encode(self, prompt: str) -> list[int]:
        """The prompt's token ids, without BOS/EOS, untruncated."""
        if not self._vocab:
            return self._encode_fallback(prompt)
        ids: list[int] = []
        for raw in self._split_specials(prompt, self._raw_specials):
            if isinstance(raw, int):
                ids.append(raw)
                continue
            for piece in self._split_specials(normalize(raw), self._norm_specials):
                if isinstance(piece, int):
                    ids.append(piece)
                else:
                    for word in split_words(piece):
                        ids += self._bpe(word)
        return ids

    @property
    def chunk_tokens(self) -> int:
        """Prompt tokens one max_length block holds (75): the rest are BOS and EOS."""
        return self.max_length - 2

    def chunks(self, prompt: str) -> int:
        """How many max_length blocks hold the whole prompt (at least 1)."""
        return self.chunks_for(len(self.encode(prompt)))

    def chunks_for(self, tokens: int) -> int:
        """How many max_length blocks hold ``tokens`` prompt tokens (at least 1)."""
        return max(1, -(-tokens // self.chunk_tokens))

    def overflow(self, prompt: str, chunks: int = 1) -> int:
        """How many of the prompt's tokens fall past ``chunks`` blocks (what the text encoder reads): 0 if none."""
        return max(0, len(self.encode(prompt)) - chunks * self.chunk_tokens)

    def __call__(self, prompts: list[str] | str, chunks: int = 1) -> torch.Tensor:
        """[B] prompts -> ids [B, chunks · max_length]: block j of a row is BOS, the prompt's tokens
        [75j, 75j + 75), EOS, padding. Tokens past the last block are dropped."""
        if isinstance(prompts, str):
            prompts = [prompts]
        return self.blocks([self.encode(p) for p in prompts], chunks)

    def blocks(self, token_lists: list[list[int]], chunks: int = 1) -> torch.Tensor:
        """Token ids without BOS/EOS (one list a prompt) -> ids [B, chunks · max_length], as __call__ lays them out."""
        rows = [self.layout(t, chunks, self.bos_token_id, self.eos_token_id, self.pad_token_id) for t in token_lists]
        return torch.tensor(rows, dtype=torch.long)  # [B, chunks · max_length]

    def layout(self, values: list, chunks: int, first: object, last: object, fill: object) -> list:
        """One row of ``chunks`` blocks: [first, values[75j : 75j + 75], last, fill ...] for block j (per-token
        values of any kind: ids, or weights with first = last = fill = 1)."""
        if not isinstance(chunks, int) or chunks < 1:
            raise ValueError(f"chunks must be an integer >= 1, got {chunks!r}")
        n = self.chunk_tokens
        row: list = []
        for j in range(chunks):
            body = values[j * n : (j + 1) * n]
            row += [first, *body, last] + [fill] * (n - len(body))
        return row

    def __repr__(self) -> str:
        return f"Tokenizer({self.source}, vocab={self.vocab_size}, pad={self.pad_token_id}, len={self.max_length})"
