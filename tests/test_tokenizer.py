import json

import pytest
import torch

from checkpoints import BOS, EOS, TOKENIZER_VOCAB_SIZE, make_tokenizer_files, tokenizer_vocab
from speedsd.tokenizer import Tokenizer, has_tokenizer_files

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
