"""speedsd.prompts: 75-token blocks and AUTOMATIC1111's emphasis syntax (parse, token weights, the
embedding reweighting), and the pipeline reading them."""

from __future__ import annotations

import pytest
import torch

from checkpoints import make_diffusers_folder
from speedsd import prompts
from speedsd.prompts import apply_weights, parse, prompt_chunks, prompt_ids, weighted_ids, weighted_tokens
from speedsd.tokenizer import Tokenizer

R, S = 1.1, 1 / 1.1


@pytest.mark.parametrize(
    "text,want",
    [
        pytest.param("a red fox", [("a red fox", 1.0)], id="plain"),
        pytest.param("", [("", 1.0)], id="empty"),
        pytest.param("a (red) fox", [("a ", 1.0), ("red", R), (" fox", 1.0)], id="round"),
        pytest.param("((red))", [("red", R * R)], id="nested"),
        pytest.param("[red]", [("red", S)], id="square"),
        pytest.param("(red:1.5) fox", [("red", 1.5), (" fox", 1.0)], id="number"),
        pytest.param("( red : 0.5 )", [(" red ", 0.5)], id="number-spaces"),
        pytest.param("(w:-1)", [("w", -1.0)], id="negative"),
        pytest.param("((a) b:2)", [("a", 2 * R), (" b", 2.0)], id="number-outside-round"),
        pytest.param("[(a)]", [("a", S * R)], id="mixed"),
        pytest.param("x (open", [("x ", 1.0), ("open", R)], id="unclosed-round"),
        pytest.param("x [open", [("x ", 1.0), ("open", S)], id="unclosed-square"),
        pytest.param("a) b]", [("a) b]", 1.0)], id="stray-closers"),
        pytest.param(r"\(lit\) \[x\] \\", [(r"(lit) [x] \ ".rstrip(), 1.0)], id="escapes"),
        pytest.param("(a:b)", [("a:b", R)], id="colon-not-a-number"),
        pytest.param("(a:1.2.3)", [("a:1.2.3", R)], id="bad-number"),
        pytest.param("time: 5", [("time: 5", 1.0)], id="colon-outside"),
        pytest.param("(a)(b)", [("ab", R)], id="equal-neighbours-merge"),
    ],
)
def test_parse(text: str, want: list[tuple[str, float]]) -> None:
    got = parse(text)
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [w for _, w in got] == pytest.approx([w for _, w in want], rel=1e-12)


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    from checkpoints import make_tokenizer_files

    return Tokenizer.from_dir(make_tokenizer_files(tmp_path_factory.mktemp("tok") / "tok"))


def test_weighted_tokens_and_layout(tok: Tokenizer) -> None:
    """Each run is tokenized on its own and its tokens carry its weight; the ids sit where tokenizer() puts
    them, BOS/EOS/padding weigh 1; plain prompts give the plain ids and all-one weights."""
    ids, w = weighted_tokens(tok, "a (photo:1.5) [the]")
    assert ids == tok.encode("a ") + tok.encode("photo") + tok.encode("the")
    assert w == [1.0] * len(tok.encode("a ")) + [1.5] * len(tok.encode("photo")) + [S] * len(tok.encode("the"))
    texts = ["a photo of the", "(the photo) " * 45]
    long_ids, _ = weighted_tokens(tok, texts[1])
    k = prompt_chunks(tok, texts, weighted=True)
    assert k == -(-len(long_ids) // 75) == 2
    assert prompt_chunks(tok, texts) > k  # the brackets are tokens when not read as emphasis
    ids_t, w_t = weighted_ids(tok, texts, k)
    assert ids_t.shape == w_t.shape == (2, 2 * 77)
    assert torch.equal(ids_t[0], tok(texts[:1], k)[0]) and bool((w_t[0] == 1).all())
    assert torch.equal(ids_t[1], tok.blocks([long_ids], k)[0])
    assert w_t[1, 0] == 1 and w_t[1, 76] == 1 and w_t[1, 1] == pytest.approx(R)  # BOS, EOS, first token
    plain_ids, none = prompt_ids(tok, texts)
    assert none is None and torch.equal(plain_ids, tok(texts, prompt_chunks(tok, texts)))


def test_apply_weights() -> None:
    """Weights multiply each token's embedding, then each (row, block) gets back its unweighted mean; all
    ones change nothing, bit for bit."""
    g = torch.Generator().manual_seed(0)
    emb = (torch.randn(2, 154, 8, generator=g) + 0.4).half()
    ones = torch.ones(2, 154)
    assert torch.equal(apply_weights(emb, ones), emb)
    w = ones.clone()
    w[1, 80:90] = 1.5
    w[0, 3] = 0.5
    got = apply_weights(emb, w)
    z = emb.float().view(2, 2, 77, 8)
    zw = z * w.view(2, 2, 77, 1)
    want = zw * (z.mean(dim=(2, 3), keepdim=True) / zw.mean(dim=(2, 3), keepdim=True))
    torch.testing.assert_close(got.float(), want.view(2, 154, 8).half().float(), rtol=0, atol=0)
    assert got.dtype == torch.float16
    for r, b in ((0, 0), (1, 1)):  # each weighted block keeps its mean
        blk = slice(77 * b, 77 * (b + 1))
        assert float(got[r, blk].float().mean()) == pytest.approx(float(emb[r, blk].float().mean()), rel=2e-3)
    assert torch.equal(got[0, 77:], emb[0, 77:]) and torch.equal(got[1, :77], emb[1, :77])  # unweighted blocks
    zero = torch.zeros(1, 77, 4)
    assert torch.equal(apply_weights(zero, torch.full((1, 77), 2.0)), zero)  # a zero mean: no division by it
    with pytest.raises(ValueError, match="do not match"):
        apply_weights(emb, ones[:, :77])


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    import speedsd

    return speedsd.load(str(make_diffusers_folder(tmp_path_factory.mktemp("sd1"), kind="sd1")), device="cpu")


def test_pipeline_reads_weights_only_when_asked(pipe, monkeypatch) -> None:
    """prompt_weights=True: the UNet gets the reweighted embeddings of the parsed prompt; a prompt without
    emphasis gives the same image either way; prompt_weights=False reads brackets as text."""
    import speedsd.pipeline

    seen = []
    real = speedsd.pipeline.denoise
    monkeypatch.setattr(speedsd.pipeline, "denoise", lambda *a, **k: seen.append(a[4]) or real(*a, **k))
    kw = dict(negative_prompt="blurry", steps=2, height=32, width=32, seed=1, scheduler="ddim", output="latent")
    prompt = "a red (fox:1.8) in [the] snow"
    weighted = pipe(prompt, prompt_weights=True, **kw)
    ids, w = weighted_ids(pipe.tokenizer, ["blurry", prompt], 1)
    with torch.no_grad():
        want = apply_weights(pipe.encode_ids(ids), w)
    torch.testing.assert_close(seen[0], want, rtol=0, atol=0)
    literal = pipe(prompt, **kw)
    assert not torch.equal(seen[1], seen[0]) and not torch.equal(literal, weighted)
    plain = "a red fox in the snow"
    assert torch.equal(pipe(plain, prompt_weights=True, **kw), pipe(plain, **kw))
    with pytest.raises(ValueError, match="prompt_weights must be true or false"):
        pipe(plain, prompt_weights=1, **kw)


def test_truncation_warnings_count_weighted_tokens(tok: Tokenizer) -> None:
    text = "(the:1.2) " * 70  # 70 tokens read as emphasis, 70 + the brackets' tokens as text
    assert prompts.truncation_warnings(tok, text, None, truncate=True, weighted=True) == []
    [line] = prompts.truncation_warnings(tok, text, None, truncate=True)
    assert line.startswith("the prompt is ") and "reads the first 75" in line
