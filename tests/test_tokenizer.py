"""speedsd's own CLIP tokenizer: the API, and id-for-id agreement with transformers' CLIPTokenizer."""

import json
import os
import re
import subprocess
import sys
import unicodedata
from collections import Counter
from pathlib import Path

import pytest
import torch

from checkpoints import BOS, EOS, TOKENIZER_VOCAB_SIZE, make_tokenizer_files, tokenizer_vocab
from speedsd.tokenizer import Tokenizer, _pad_token_in_files, has_tokenizer_files, normalize, split_words
from speedsd.weights import TOKENIZER_REPOS, cached_snapshot

V = tokenizer_vocab()


def _row(*tokens: str, pad: str = EOS) -> list[int]:
    ids = [V[BOS], *(V[t] for t in tokens), V[EOS]]
    return ids + [V[pad]] * (77 - len(ids))


def test_from_dir_bpe_merges_bos_eos_and_padding(tmp_path):
    tok = Tokenizer.from_dir(make_tokenizer_files(tmp_path / "tok"))
    ids = tok(["A photo of THE", "b!"])
    assert ids.dtype == torch.long and ids.shape == (2, 77)
    # merges: "photo" -> one token, "of"/"the" -> word-final tokens; lower-cased; "!" split off "b"
    assert ids[0].tolist() == _row("a</w>", "photo</w>", "of</w>", "the</w>")
    assert ids[1].tolist() == _row("b</w>", "!</w>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (V[BOS], V[EOS], V[EOS])
    assert tok.vocab_size == TOKENIZER_VOCAB_SIZE


def test_pad_token_from_files_and_family_default(tmp_path):
    sd2_files = make_tokenizer_files(tmp_path / "sd2", pad_token="!")
    bare = make_tokenizer_files(tmp_path / "bare")
    # the files' pad token wins over the caller's default
    assert Tokenizer.from_dir(sd2_files, pad_token=EOS)(["photo"])[0].tolist() == _row("photo</w>", pad="!")
    assert V["!"] == 0  # as in CLIP's vocabulary: SD 2.x pads with id 0
    # bare vocab.json + merges.txt: the family default the caller passes
    assert Tokenizer.from_dir(bare, pad_token="!")(["photo"])[0].tolist() == _row("photo</w>", pad="!")
    assert Tokenizer.from_dir(bare)(["photo"])[0].tolist() == _row("photo</w>", pad=EOS)


def test_truncation_keeps_eos(tmp_path):
    tok = Tokenizer.from_dir(make_tokenizer_files(tmp_path / "tok"))
    ids = tok(["the " * 200])
    assert ids.shape == (1, 77)
    assert ids[0, 0] == V[BOS] and ids[0, 76] == V[EOS]
    assert (ids[0, 1:76] == V["the</w>"]).all()


def test_overflow_counts_the_tokens_truncation_drops(tmp_path):
    for tok in (Tokenizer.from_dir(make_tokenizer_files(tmp_path / "tok")), Tokenizer.fallback()):
        assert tok.overflow("the " * 75) == 0 and tok.overflow("") == 0  # 75 + BOS + EOS fill the 77
        assert tok.overflow("the " * 76) == 1 and tok.overflow("the " * 200) == 125
        kept = tok(["the " * 200])[0, 1:76]
        assert torch.equal(kept, tok(["the " * 75])[0, 1:76])  # what overflow counts is what __call__ drops


def test_chunks_are_77_blocks_of_75_tokens(tmp_path):
    """chunks=k: block j is BOS, tokens [75j, 75j + 75), EOS, padding; an empty block is BOS, EOS, padding.
    chunks=1 is the plain (truncating) call."""
    for tok in (Tokenizer.from_dir(make_tokenizer_files(tmp_path / "tok")), Tokenizer.fallback(pad_id=7)):
        prompt = " ".join(["the", "photo", "a"] * 53)  # 159 tokens: 75 + 75 + 9
        tokens = tok.encode(prompt)
        assert len(tokens) == 159 and tok.chunks(prompt) == 3
        assert tok.chunks("") == 1 and tok.chunks("the " * 75) == 1 and tok.chunks("the " * 76) == 2
        ids = tok([prompt, "photo"], chunks=4)
        assert ids.shape == (2, 4 * 77)
        for j, block in enumerate(ids[0].view(4, 77).tolist()):
            body = tokens[75 * j : 75 * (j + 1)]
            assert block == [tok.bos_token_id, *body, tok.eos_token_id] + [tok.pad_token_id] * (75 - len(body))
        empty = [tok.bos_token_id, tok.eos_token_id] + [tok.pad_token_id] * 75
        assert ids[1].view(4, 77)[1:].tolist() == [empty] * 3
        assert torch.equal(ids[:, :77], tok([prompt, "photo"]))  # block 0 = the truncating call
        assert tok.overflow(prompt, 2) == 9 and tok.overflow(prompt, 3) == 0
        with pytest.raises(ValueError, match="chunks must be an integer >= 1"):
            tok("photo", chunks=0)


def test_from_dir_errors(tmp_path):
    d = tmp_path / "half"
    d.mkdir()
    (d / "vocab.json").write_text(json.dumps(V))
    assert not has_tokenizer_files(d)
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        Tokenizer.from_dir(d)
    (d / "merges.txt").write_text("#version: 0.2\nt h\n")
    (d / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))  # no byte symbols, no specials
    with pytest.raises(ValueError, match="half"):
        Tokenizer.from_dir(d)


def test_fallback_is_deterministic_and_in_range():
    tok = Tokenizer.fallback(1000)
    a = tok(["a red cube, on a table", "a red cube, on a table", "something else"])
    assert a.shape == (3, 77)
    assert torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
    assert a[0, 0] == 998 and a.max() <= 999 and a.min() >= 0
    n = 1 + 7  # BOS + a, red, cube, ",", on, a, table
    assert a[0, n] == 999 and (a[0, n + 1 :] == 999).all()  # EOS, then EOS padding
    assert (Tokenizer.fallback(49408, pad_id=0)(["x"])[0, 3:] == 0).all()
    long = Tokenizer.fallback()(["w " * 300])
    assert long.shape == (1, 77) and long[0, -1] == 49407
    assert tok.source == "fallback"


# ---------------------------------------------------------------------------------------------
# Same ids as transformers' CLIPTokenizer (the oracle) on the same files
# ---------------------------------------------------------------------------------------------

TRAIN_TEXT = """
a photograph of an astronaut riding a horse on the moon, highly detailed, 8k, trending on artstation
portrait of a beautiful woman, oil painting by greg rutkowski and alphonse mucha, intricate, elegant
a cute cat sitting on a wooden table in the kitchen, soft lighting, depth of field, bokeh, masterpiece
landscape with mountains and a lake at sunset, dramatic clouds, volumetric light, unreal engine
the city of the future at night, neon lights, cyberpunk, rain, reflections, cinematic composition
it's the painter's studio; they're sure we'll see what you've done, i'm told he'd said it!!! ... ???
café crème brûlée, niño jalapeño, façade über naïve, smörgåsbord, déjà vu résumé
日本語のテキスト 東京の夜景 桜の花 ελληνικά κείμενα αθήνα ακρόπολη русский текст москва
1920s 1980s 3.14 2024 4k 16:9 f/1.8 50mm 35mm iso 100 photo photos photography photographer
"""

PROMPTS = [
    "a photo of an astronaut riding a horse on the moon",
    "A PHOTO OF AN ASTRONAUT RIDING A HORSE",
    "Portrait Of A Beautiful Woman, Oil Painting By Greg Rutkowski",
    "masterpiece, best quality, highly detailed, 8k, trending on artstation",
    "the city of the future at night... neon lights!!! (cyberpunk), [rain], {reflections}",
    "wow?!?! --- ::: ;;; ,,, ... ''' \"\"\" ``` ~~~ @@@ ### $$$ %%% ^^^ &&& *** (((",
    "it's the painter's studio; they're sure we'll see what you've done, I'm told he'd said it",
    "IT'S THEY'RE WE'LL YOU'VE I'M HE'D DON'T CAN'T",
    "'s 't 're 've 'm 'll 'd ''s '''re 'ss 'tt 'red 'vex 'mm 'lll 'dd 'x ' s",
    "rock'n'roll o'clock y'all ma'am 'quoted' \u2019curly\u2019 it\u2019s",
    "the 1920s, 1980s and 2024; pi is 3.14 and e is 2.71828",
    "16:9 f/1.8 50mm 35mm ISO-100 1/250s 4k uhd 10,000 100%",
    "café crème brûlée niño jalapeño façade über naïve smörgåsbord",
    "CAFÉ CRÈME BRÛLÉE NIÑO JALAPEÑO FAÇADE ÜBER NAÏVE",
    "cafe\u0301 decomposed e\u0301 vs composed é, A\u030a vs Å",
    "日本語のテキスト 東京の夜景 桜の花",
    "Ελληνικά κείμενα, ΑΘΗΝΑ ΑΚΡΌΠΟΛΗ, ΣΟΦΟΣ ΣΑΣ",
    "русский текст, МОСКВА, Straße STRASSE İstanbul ǅ ﬁ ﬀ",
    "हिन्दी पाठ, العربية, עברית, 한국어 텍스트, ไทย",
    "emoji 😀🎉🔥 cat 🐱 flag 🇯🇵 family 👨‍👩‍👧 skin 👍🏽 heart ❤️",
    "math ∑∫√∞ ≤≥ ½ ¾ ² ³ ① Ⅻ ٣ ३ 〇 and arrows → ← ↑",
    "tabs\tand\tnewlines\nand\r\nmultiple     spaces   here",
    "   leading and trailing spaces   ",
    "nbsp\u00a0thin\u2009ideographic\u3000space zero\u200bwidth soft\u00adhyphen",
    "odd controls \x1c\x1d\x1e\x1f \x00 \x07 \x7f \x85 \u2028 \u2029 \ufeff",
    "a <|endoftext|> b <|startoftext|> c",
    "<|startoftext|>start<|endoftext|>",
    "<|ENDOFTEXT|> and <|StartOfText|>! and x<|endoftext|>y!",
    "!<|startoftext|>! <|endoftext|>!!",
    "<|endoftext|",
    "",
    " ",
    "!",
    "hello!!! world! wow!?",
    "a",
    "photo photos photography photographer photographic",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "x" * 200,
    "under_score snake_case kebab-case CamelCase mixedCASE123abc",
    "https://example.com/path?q=1&b=2 user@mail.org #hashtag @mention",
    "(masterpiece:1.2), [[[low quality]]], <lora:thing:0.8>, {a|b|c}",
    "html &amp; entities &lt;b&gt; and ftfy mojibake cafÃ© donâ€™t",
    "\u00c5ngstr\u00f6m \u212b \u2126 ohm K kelvin \u212a",
    " ".join(f"word{i}" for i in range(300)),
    " ".join("a photo of a cat on the moon at night with stars".split() * 30),
]


def _byte_symbols() -> dict[int, str]:
    """The test's own byte -> symbol table (CLIP/GPT-2 convention), independent of the code under test."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    rest = [b for b in range(256) if b not in keep]
    return {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(rest)}


def _train_bpe(text: str, n_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A real-format CLIP vocabulary: bytes, bytes + </w>, then greedily learned merges, then BOS, EOS."""
    sym = _byte_symbols()
    words: Counter[tuple[str, ...]] = Counter()
    for w in re.findall(r"\w+|[^\w\s]+", text.lower()):
        s = [sym[b] for b in w.encode()]
        words[(*s[:-1], s[-1] + "</w>")] += 1
    merges = []
    for _ in range(n_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for w, f in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += f
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for w, f in words.items():
            out, k = [], 0
            while k < len(w):
                take = 2 if w[k : k + 2] == best else 1
                out.append("".join(w[k : k + take]))
                k += take
            merged[tuple(out)] += f
        words = merged
    order = list(sym.values())  # printable bytes first: "!" is id 0, as in CLIP
    vocab: dict[str, int] = {}
    for t in order + [s + "</w>" for s in order] + [a + b for a, b in merges] + [BOS, EOS]:
        vocab.setdefault(t, len(vocab))
    return vocab, merges


def _write(d, vocab, merges, **json_files) -> Path:
    d.mkdir(parents=True)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    for name, content in json_files.items():
        (d / f"{name}.json").write_text(json.dumps(content))
    return d


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return _train_bpe(TRAIN_TEXT * 3 + " ".join(PROMPTS[:20]), 400)


def _oracle_ids(path: Path, pad: str, prompts: list[str]) -> torch.Tensor:
    """transformers' ids, loaded as diffusers does; ``pad`` is passed only when the files name none."""
    transformers = pytest.importorskip("transformers")
    kw = {} if _pad_token_in_files(path) else {"pad_token": pad}
    ref = transformers.CLIPTokenizer.from_pretrained(str(path), local_files_only=True, **kw)
    enc = ref(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    return enc["input_ids"]


def _assert_same_ids(ours: torch.Tensor, ref: torch.Tensor, prompts: list[str]) -> None:
    assert ours.shape == ref.shape == (len(prompts), 77) and ours.dtype == torch.long
    bad = [
        (p[:50], ours[i].tolist(), ref[i].tolist()) for i, p in enumerate(prompts) if not torch.equal(ours[i], ref[i])
    ]
    assert not bad, f"{len(bad)} prompt(s) differ; first: {bad[0]}"


@pytest.mark.parametrize("pad", [EOS, "!"], ids=["sd1-pad-eos", "sd2-pad-bang"])
def test_same_ids_as_transformers_on_trained_vocab(tmp_path, trained, pad):
    vocab, merges = trained
    path = _write(tmp_path / "tok", vocab, merges)
    tok = Tokenizer.from_dir(path, pad_token=pad)
    ours = tok(PROMPTS)
    _assert_same_ids(ours, _oracle_ids(path, pad, PROMPTS), PROMPTS)
    # the corpus does exercise what it is meant to: learned merges, truncation, the pad id
    assert len(PROMPTS) >= 40 and len(merges) == 400
    assert (ours >= 512).sum() > 100  # ids past the 2 x 256 byte symbols are merged tokens
    assert len(tok.encode(PROMPTS[-2])) > 75 and ours[-2, -1] == tok.eos_token_id
    assert ours[PROMPTS.index(""), 2:].eq(vocab[pad]).all()
    if pad == "!":  # SD 2.x: "!" is a special token, cut out of the text ("!!!" -> three id-0 tokens)
        assert tok.encode("wow!!!")[-3:] == [0, 0, 0]


def _added(content: str, normalized: bool) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": normalized, "rstrip": False}


def _roles(normalized: bool | None, pad: str) -> dict:
    """bos/eos/unk as AddedToken dicts (``normalized`` True/False) or plain strings (None)."""
    tok = (lambda c: c) if normalized is None else (lambda c: _added(c, normalized))
    return {"bos_token": tok(BOS), "eos_token": tok(EOS), "unk_token": tok(EOS), "pad_token": pad}


# Where the files say whether BOS/EOS are matched before or after lowercasing ("<|ENDOFTEXT|>").
JSON_LAYOUTS = {
    "sd1-hub": lambda: {"tokenizer_config": _roles(True, EOS), "special_tokens_map": _roles(True, EOS)},
    "sd2-hub": lambda: {"tokenizer_config": _roles(True, "!"), "special_tokens_map": _roles(True, "!")},
    "plain-strings": lambda: {"tokenizer_config": _roles(None, EOS), "special_tokens_map": _roles(None, EOS)},
    "config-true-map-false": lambda: {"tokenizer_config": _roles(True, EOS), "special_tokens_map": _roles(False, EOS)},
    "config-false-map-true": lambda: {"tokenizer_config": _roles(False, EOS), "special_tokens_map": _roles(True, EOS)},
    "config-only-true": lambda: {"tokenizer_config": _roles(True, EOS)},
    "unk-only-true": lambda: {"tokenizer_config": {"unk_token": _added(EOS, True)}},
    "eos-true-unk-false": lambda: {
        "tokenizer_config": {"eos_token": _added(EOS, True), "unk_token": _added(EOS, False)}
    },
    "pad-true": lambda: {"special_tokens_map": {**_roles(None, EOS), "pad_token": _added(EOS, True)}},
    "added-tokens-decoder": lambda: {
        "tokenizer_config": {
            **_roles(False, EOS),
            "added_tokens_decoder": {
                "0": {"content": BOS, "normalized": True, "special": True},
                "1": {"content": EOS, "normalized": False, "special": True},
            },
        }
    },
}


@pytest.mark.parametrize("layout", JSON_LAYOUTS)
def test_same_ids_as_transformers_for_special_token_json(tmp_path, trained, layout):
    vocab, merges = trained
    path = _write(tmp_path / "tok", vocab, merges, **JSON_LAYOUTS[layout]())
    prompts = [p for p in PROMPTS if "<|" in p or "!" in p] + ["<|ENDOFTEXT|>", "<|StartOfText|>x", "A<|EndOfText|>B"]
    tok = Tokenizer.from_dir(path)
    ours = tok(prompts)
    _assert_same_ids(ours, _oracle_ids(path, EOS, prompts), prompts)
    upper_is_eos = tok.encode("<|ENDOFTEXT|>") == [tok.eos_token_id]
    assert upper_is_eos == (layout in ("sd2-hub", "unk-only-true", "pad-true"))  # the flags are really read


def test_same_ids_as_transformers_with_tokens_missing_from_vocab(tmp_path, trained):
    """Symbols not in vocab.json become unk (EOS), one per symbol, as in the oracle."""
    vocab, merges = trained
    sym = _byte_symbols()
    drop = {sym[0xC3], sym[0xA9] + "</w>", sym[0xE6]}  # parts of "é" and of many CJK characters
    merges = [m for m in merges if not drop & {m[0], m[1], m[0] + m[1]}]
    path = _write(tmp_path / "tok", {t: i for i, t in enumerate(t for t in vocab if t not in drop)}, merges)
    prompts = [p for p in PROMPTS if any(ord(c) > 127 for c in p)]
    tok = Tokenizer.from_dir(path)
    _assert_same_ids(tok(prompts), _oracle_ids(path, EOS, prompts), prompts)
    assert tok.eos_token_id in tok.encode("café")


def test_same_ids_as_transformers_over_unicode(tmp_path, trained):
    """Every code point below U+3000 and a spread of the rest: letters, digits, marks, spaces, casing.

    Only code points assigned in this Python's unicodedata: newer ones (Unicode 15+) are letters to
    the oracle and unassigned to us, the one known difference."""
    vocab, merges = trained
    path = _write(tmp_path / "tok", vocab, merges)
    cps = [*range(0x3000), *range(0x3000, 0x110000, 97)]
    chars = [chr(c) for c in cps if not 0xD800 <= c < 0xE000 and unicodedata.category(chr(c)) != "Cn"]
    prompts = [" ".join(f"a{c}{c.upper()}1{c}z" for c in chars[k : k + 12]) for k in range(0, len(chars), 12)]
    assert len(chars) > 13000
    tok = Tokenizer.from_dir(path)
    transformers = pytest.importorskip("transformers")
    ref = transformers.CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
    want = ref(prompts, add_special_tokens=False)["input_ids"]
    bad = [(p, tok.encode(p), w) for p, w in zip(prompts, want) if tok.encode(p) != w]
    assert not bad, f"{len(bad)} differ; first: {bad[0]}"


def _real_clip_dirs() -> list[Path]:
    """CLIP tokenizer folders already in the local hub cache (nothing is downloaded)."""
    found = []
    for repos in TOKENIZER_REPOS.values():
        for repo, sub in repos:
            snap = cached_snapshot(repo)
            if snap is not None and has_tokenizer_files(snap / sub):
                found.append(snap / sub)
    return found


@pytest.mark.skipif(not _real_clip_dirs(), reason="no real CLIP tokenizer in the local hub cache")
@pytest.mark.parametrize("path", _real_clip_dirs(), ids=lambda p: str(p.parts[-4:]))
def test_same_ids_as_transformers_on_real_clip_vocab(path):
    tok = Tokenizer.from_dir(path)
    _assert_same_ids(tok(PROMPTS), _oracle_ids(path, EOS, PROMPTS), PROMPTS)
    assert tok("a photo of a cat")[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.vocab_size == 49408


# ---------------------------------------------------------------------------------------------
# The steps on their own
# ---------------------------------------------------------------------------------------------


def test_split_words_and_normalize():
    assert split_words("it's 1920s, ok?! 'LL") == ["it", "'s", "1", "9", "2", "0", "s", ",", "ok", "?!", "'", "LL"]
    assert split_words("''s x'rex <|endoftext|>! !<|endoftext|>") == [
        *["''", "s", "x", "'re", "x"],
        *["<|", "endoftext", "|>", "!"],
        *["!<|", "endoftext", "|>"],
    ]
    assert split_words("日本\tδ\u0301x\x1cy\u3000z") == ["日本", "δ", "\u0301", "x", "\x1c", "y", "z"]
    assert normalize("ΣΑΣ Cafe\u0301 İ") == "σασ café i\u0307"


def test_bpe_follows_merge_rank_not_file_position(tmp_path):
    """Merge "b c</w>" ranks before "a b": "abc" is a + bc, though "ab" comes first from the left."""
    vocab = tokenizer_vocab()
    for t in ("bc</w>", "ab"):
        vocab[t] = len(vocab)
    path = _write(tmp_path / "tok", vocab, [("b", "c</w>"), ("a", "b")])
    tok = Tokenizer.from_dir(path)
    assert tok.encode("abc abd") == [V["a"], vocab["bc</w>"], vocab["ab"], V["d</w>"]]


def test_bad_files_raise_value_error(tmp_path):
    vocab = tokenizer_vocab()
    cases = {
        "bad-json": ("{not json", "#version: 0.2\n"),
        "not-a-dict": ("[1, 2]", "#version: 0.2\n"),
        "three-parts": (json.dumps(vocab), "#version: 0.2\nt h e\n"),
        "result-not-in-vocab": (json.dumps(vocab), "#version: 0.2\na b\n"),
    }
    for name, (v, m) in cases.items():
        d = tmp_path / name
        d.mkdir()
        (d / "vocab.json").write_text(v)
        (d / "merges.txt").write_text(m)
        with pytest.raises(ValueError, match=name):
            Tokenizer.from_dir(d)


def test_runtime_does_not_import_transformers():
    code = "import sys, speedsd.pipeline, speedsd.cli; sys.exit('transformers' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=120).returncode == 0
