"""How prompt strings become the text encoder's token ids: blocks of 75 tokens, and AUTOMATIC1111's emphasis.

Blocks: a prompt past the text encoder's 75 tokens is read in blocks of 75 (each BOS, 75 tokens, EOS,
padding; encoded on its own; the embeddings side by side), as many as the longest prompt of a batch needs, up
to MAX_PROMPT_CHUNKS; ``truncate`` reads the first block only, as diffusers does.

Emphasis, read when a call passes ``prompt_weights=True``:

    (text)      text's weight x 1.1; ((text)) x 1.21 ...
    [text]      x 1/1.1
    (text:1.3)  x 1.3 (any decimal number, a sign allowed)
    \\( \\) \\[ \\] \\\\   the characters themselves

Brackets nest and their factors multiply. A bracket never closed applies its factor up to the end of the
prompt; a closing bracket with no opener, or a ``:`` that does not end a ``(text:number)``, is plain text.
Without ``prompt_weights`` every character is plain text, as diffusers reads prompts. Not read (plain text
here): the web UI's ``BREAK``, prompt editing ``[a:b:0.5]`` and alternation ``[a|b]``.

How the weights act (the web UI's way): each run of text between markers is tokenized on its own and its
tokens carry the run's weight; BOS, EOS and padding weigh 1. After the text encoder each token's embedding
is multiplied by its weight, and each 77-token block is then scaled back to the mean it had unweighted, so
the weights move the context's direction, not its overall level. With every weight 1 the embeddings are the
unweighted ones, bit for bit. (The web UI takes that mean over a whole batch of prompts; here it is per
prompt, so a prompt's embeddings do not depend on what it is batched with.)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from speedsd.inputs import check_flag

MAX_PROMPT_CHUNKS = 8  # blocks of 75 tokens: 600 tokens
ROUND, SQUARE = 1.1, 1 / 1.1  # what ( ) and [ ] multiply by
_WEIGHT = re.compile(r":\s*([+-]?[0-9.]+)\s*\)")  # the ":1.3)" that closes a (text:1.3)
_ESCAPED = "()[]\\"


def parse(prompt: str) -> list[tuple[str, float]]:
    """The prompt as (text, weight) runs in order, neighbours of equal weight merged; [("", 1.0)] if empty.

    >>> parse("a (red:1.5) fox [in] ((snow))")
    [('a ', 1.0), ('red', 1.5), (' fox ', 1.0), ('in', 0.9090909090909091), (' ', 1.0), ('snow', 1.2100000000000002)]
    """
    runs: list[list[Any]] = []  # [text, weight], weights multiplied in place as groups close
    opened: dict[str, list[int]] = {"(": [], "[": []}  # index of the first run of each open group
    text: list[str] = []

    def flush() -> None:
        if text:
            runs.append(["".join(text), 1.0])
            text.clear()

    def close(kind: str, factor: float) -> None:
        flush()
        for run in runs[opened[kind].pop() :]:
            run[1] *= factor

    i = 0
    while i < len(prompt):
        c = prompt[i]
        if c == "\\" and i + 1 < len(prompt) and prompt[i + 1] in _ESCAPED:
            text.append(prompt[i + 1])
            i += 2
            continue
        if c in "([":
            flush()
            opened[c].append(len(runs))
        elif c == ")" and opened["("]:
            close("(", ROUND)
        elif c == "]" and opened["["]:
            close("[", SQUARE)
        elif c == ":" and opened["("] and (m := _WEIGHT.match(prompt, i)) and _is_number(m.group(1)):
            close("(", float(m.group(1)))
            i = m.end()
            continue
        else:
            text.append(c)
        i += 1
    flush()
    for kind, factor in (("(", ROUND), ("[", SQUARE)):  # groups never closed reach to the end
        while opened[kind]:
            for run in runs[opened[kind].pop() :]:
                run[1] *= factor
    merged: list[tuple[str, float]] = []
    for t, w in runs:
        if merged and merged[-1][1] == w:
            merged[-1] = (merged[-1][0] + t, w)
        else:
            merged.append((t, w))
    return merged or [("", 1.0)]


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def weighted_tokens(tokenizer: Any, prompt: str) -> tuple[list[int], list[float]]:
    """The prompt's token ids (no BOS/EOS) and each token's weight: every run tokenized on its own."""
    ids: list[int] = []
    weights: list[float] = []
    for text, w in parse(prompt):
        run = tokenizer.encode(text)
        ids += run
        weights += [w] * len(run)
    return ids, weights


def weighted_ids(tokenizer: Any, prompts: list[str], chunks: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """[B] prompts -> ids [B, chunks · 77] laid out as ``tokenizer(prompts, chunks)`` lays them out, and the
    fp32 weights [B, chunks · 77] of those positions (1 for BOS, EOS and padding)."""
    return _laid_out(tokenizer, [weighted_tokens(tokenizer, p) for p in prompts], chunks)


def _laid_out(
    tokenizer: Any, rows: list[tuple[list[int], list[float]]], chunks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    # (ids, weights) of each prompt -> ids [B, chunks · 77] and their fp32 weights, BOS/EOS/padding weighing 1
    ids = tokenizer.blocks([r[0] for r in rows], chunks)
    weights = [tokenizer.layout(r[1], chunks, 1.0, 1.0, 1.0) for r in rows]
    return ids, torch.tensor(weights, dtype=torch.float32)


def apply_weights(emb: torch.Tensor, weights: torch.Tensor, block: int = 77) -> torch.Tensor:
    """Text embeddings [B, k·block, D] times their tokens' weights [B, k·block], each (row, block) scaled back
    to its unweighted mean; computed in fp32, returned in emb's dtype."""
    b, n, d = emb.shape
    if weights.shape != (b, n) or n % block:
        raise ValueError(f"weights {tuple(weights.shape)} do not match embeddings {tuple(emb.shape)}")
    z = emb.float().view(b, n // block, block, d)  # [B, k, 77, D]
    w = weights.to(emb.device, torch.float32).view(b, n // block, block, 1)
    weighted = z * w
    before = z.mean(dim=(2, 3), keepdim=True)
    after = weighted.mean(dim=(2, 3), keepdim=True)
    scale = torch.where(after != 0, before / after, torch.ones_like(after))  # a zero mean: left unscaled
    return (weighted * scale).to(emb.dtype).view(b, n, d)


def token_count(tokenizer: Any, text: str, weighted: bool = False) -> int:
    """How many tokens the text encoder gets from ``text`` (without BOS/EOS); ``weighted``: with the
    emphasis syntax read, its brackets are not tokens."""
    return len(weighted_tokens(tokenizer, text)[0]) if weighted else len(tokenizer.encode(text))


def prompt_chunks(tokenizer: Any, texts: Sequence[str], truncate: bool = False, weighted: bool = False) -> int:
    """How many 75-token blocks the text encoder reads for a batch of prompts (negatives included: every
    row of one batch has the same length): 1 with ``truncate`` (diffusers' behaviour), else enough for the
    longest prompt, at most MAX_PROMPT_CHUNKS. ``weighted``: prompts in the emphasis syntax."""
    check_flag(weighted, "prompt_weights")
    return _chunks_for(tokenizer, [token_count(tokenizer, t, weighted) for t in texts if t], truncate)


def _chunks_for(tokenizer: Any, counts: list[int], truncate: bool) -> int:
    # blocks for a batch whose prompts have these token counts
    check_flag(truncate, "truncate_prompt")
    if truncate:
        return 1
    return min(MAX_PROMPT_CHUNKS, tokenizer.chunks_for(max(counts, default=0)))


def truncation_warnings(
    tokenizer: Any, prompt: str, negative_prompt: str | None = None, truncate: bool = False, weighted: bool = False
) -> list[str]:
    """One line for each of the prompt and the negative prompt that the text encoder does not read whole
    (past 75 tokens with ``truncate``, else past MAX_PROMPT_CHUNKS blocks of 75): what the CLI prints
    and the API's X-Warning header carries."""
    check_flag(weighted, "prompt_weights")
    texts = (("prompt", prompt), ("negative prompt", negative_prompt))
    counts = [token_count(tokenizer, text, weighted) if text else 0 for _, text in texts]  # each tokenized once
    keep = _chunks_for(tokenizer, counts, truncate) * tokenizer.chunk_tokens
    out = []
    for (name, _), count in zip(texts, counts):
        n = max(0, count - keep)
        if n:
            out.append(f"the {name} is {keep + n} tokens; the text encoder reads the first {keep}, the last {n} "
                       "are ignored")  # fmt: skip
    return out


def png_extras(truncate: bool, weighted: bool) -> dict[str, bool]:
    """The PNG ``parameters`` entries that record how the prompt was read (only the non-default ones)."""
    return {k: True for k, on in (("Truncate prompt", truncate), ("Prompt weights", weighted)) if on}


def prompt_ids(
    tokenizer: Any, texts: list[str], truncate: bool = False, weighted: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One text-encoder batch: ids [B, k·77] (k = :func:`prompt_chunks`), and with ``weighted`` the tokens'
    fp32 weights [B, k·77] for :func:`apply_weights` (else None)."""
    check_flag(weighted, "prompt_weights")
    if not weighted:  # each prompt tokenized once, its count deciding the blocks
        tokens = [tokenizer.encode(t) for t in texts]
        return tokenizer.blocks(tokens, _chunks_for(tokenizer, [len(t) for t in tokens], truncate)), None
    rows = [weighted_tokens(tokenizer, t) for t in texts]
    return _laid_out(tokenizer, rows, _chunks_for(tokenizer, [len(r[0]) for r in rows], truncate))
