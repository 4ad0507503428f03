"""SDXL prompt embeddings without CLIP's 77-token cut, with A1111-style token weights.

CLIP reads 77 tokens (start, 75 text tokens, end). A longer prompt is split into 75-token chunks;
each chunk is wrapped and padded exactly as the SDXL pipeline would wrap a short prompt, encoded
by both text encoders (penultimate hidden state, as SDXL does), and the chunks are concatenated
along the sequence. The pooled embedding comes from the second encoder's first chunk. The
negative prompt gets as many chunks (empty ones padded in), so both have the same length.

Weights use the A1111 syntax: ``(text:1.3)`` sets a weight, ``(text)`` multiplies by 1.1,
``[text]`` divides by 1.1, groups nest, ``\\(`` is a literal bracket. Each token's embedding is
scaled by its weight and the chunk is rescaled to its original mean. A prompt without weights
gives exactly the embeddings the pipeline's own ``encode_prompt`` gives.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

CHUNK_TOKENS = 75  # text tokens per chunk; + start and end = CLIP's 77
ROUND_FACTOR = 1.1

_TOKEN = re.compile(
    r"""
    \\[()\[\]\\]                      # an escaped bracket or backslash
    | \(                             # open a weighted group
    | \[                             # open a de-emphasised group
    | :\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)   # ':1.3)' closes a group with an explicit weight
    | \)                             # close a group: x1.1
    | \]                             # close a group: /1.1
    | [^\\()\[\]:]+                  # plain text
    | [:\\]                          # a lone colon or backslash is text
    """,
    re.VERBOSE,
)


# ----------------------------------------------------------------------------- parsing
def parse_weighted(text: str) -> list[tuple[str, float]]:
    """Split an A1111-style prompt into ``(text, weight)`` segments (adjacent equal weights merged).

    Unclosed groups apply to the rest of the prompt; stray closing brackets are plain text.
    """
    segments: list[list[Any]] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for segment in segments[start:]:
            segment[1] *= factor

    for match in _TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\") and len(token) == 2:
            segments.append([token[1], 1.0])
        elif token == "(":
            round_open.append(len(segments))
        elif token == "[":
            square_open.append(len(segments))
        elif weight is not None and round_open:
            scale(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            scale(round_open.pop(), ROUND_FACTOR)
        elif token == "]" and square_open:
            scale(square_open.pop(), 1 / ROUND_FACTOR)
        else:
            segments.append([token, 1.0])
    for start in round_open:
        scale(start, ROUND_FACTOR)
    for start in square_open:
        scale(start, 1 / ROUND_FACTOR)
    return _merge(segments)


def _merge(segments: list[list[Any]]) -> list[tuple[str, float]]:
    merged: list[tuple[str, float]] = []
    for text, weight in segments:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + text, weight)
        elif text:
            merged.append((text, weight))
    return merged or [("", 1.0)]


def with_weights(prompt: str, compel_weights: str | None) -> str:
    """The prompt with the job's ``compel_weights`` (``"(masterpiece:1.3), ..."``) appended."""
    extra = (compel_weights or "").strip()
    if not extra:
        return prompt
    return f"{prompt.rstrip().rstrip(',')}, {extra}" if prompt.strip() else extra


# ----------------------------------------------------------------------------- tokens
@dataclass
class _Tokens:
    """One tokenizer's view of a prompt: 77-token chunks with a weight per token."""

    ids: list[list[int]]
    weights: list[list[float]]

    def padded(self, chunks: int, empty: "_Tokens") -> "_Tokens":
        extra = chunks - len(self.ids)
        return _Tokens(self.ids + empty.ids * extra, self.weights + empty.weights * extra)


def _tokenize(tokenizer: Any, segments: list[tuple[str, float]]) -> _Tokens:
    ids: list[int] = []
    weights: list[float] = []
    for text, weight in segments:
        piece = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids
        ids += piece
        weights += [weight] * len(piece)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    chunks = _Tokens([], [])
    for start in range(0, max(len(ids), 1), CHUNK_TOKENS):
        part, part_weights = ids[start : start + CHUNK_TOKENS], weights[start : start + CHUNK_TOKENS]
        fill = CHUNK_TOKENS - len(part)
        chunks.ids.append([bos, *part, eos] + [pad] * fill)
        chunks.weights.append([1.0, *part_weights, 1.0] + [1.0] * fill)
    return chunks


# ----------------------------------------------------------------------------- embeddings
@dataclass
class PromptEmbeddings:
    """The four tensors the SDXL pipelines take instead of prompt strings."""

    prompt_embeds: Any
    pooled_prompt_embeds: Any
    negative_prompt_embeds: Any
    negative_pooled_prompt_embeds: Any

    def as_kwargs(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _encode(encoder: Any, tokens: _Tokens, device: Any) -> tuple[Any, Any]:
    """Penultimate hidden states (1, chunks*77, hidden), weighted, and the first chunk's output[0]."""
    import torch  # noqa: PLC0415

    ids = torch.tensor(tokens.ids, dtype=torch.long, device=device)
    output = encoder(ids, output_hidden_states=True)
    hidden = output.hidden_states[-2]
    weights = torch.tensor(tokens.weights, dtype=hidden.dtype, device=device)
    if bool((weights != 1.0).any()):
        original_mean = hidden.mean()
        hidden = hidden * weights.unsqueeze(-1)
        hidden = hidden * (original_mean / hidden.mean())
    return hidden.reshape(1, -1, hidden.shape[-1]), output[0][:1]


def _embed(pipe: Any, tokens: list[_Tokens], device: Any) -> tuple[Any, Any]:
    import torch  # noqa: PLC0415

    hidden_1, _ = _encode(pipe.text_encoder, tokens[0], device)
    hidden_2, pooled = _encode(pipe.text_encoder_2, tokens[1], device)
    return torch.cat([hidden_1, hidden_2], dim=-1), pooled


def encode_sdxl(pipe: Any, prompt: str, negative_prompt: str | None, device: Any) -> PromptEmbeddings:
    """Embeddings of ``prompt`` and ``negative_prompt`` for any SDXL pipeline sharing ``pipe``'s
    text encoders and tokenizers. An empty negative prompt gives zeros when the pipeline is
    configured so (``force_zeros_for_empty_prompt``, as SDXL base is)."""
    import torch  # noqa: PLC0415

    tokenizers = (pipe.tokenizer, pipe.tokenizer_2)
    empty = [_tokenize(t, [("", 1.0)]) for t in tokenizers]
    positive = [_tokenize(t, parse_weighted(prompt)) for t in tokenizers]
    negative = [_tokenize(t, parse_weighted(negative_prompt or "")) for t in tokenizers]
    chunks = max(len(t.ids) for t in (*positive, *negative))
    positive = [t.padded(chunks, e) for t, e in zip(positive, empty)]
    negative = [t.padded(chunks, e) for t, e in zip(negative, empty)]

    with torch.no_grad():
        prompt_embeds, pooled = _embed(pipe, positive, device)
        if not (negative_prompt or "").strip() and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
            negative_embeds, negative_pooled = torch.zeros_like(prompt_embeds), torch.zeros_like(pooled)
        else:
            negative_embeds, negative_pooled = _embed(pipe, negative, device)
    dtype = pipe.text_encoder_2.dtype
    return PromptEmbeddings(
        prompt_embeds=prompt_embeds.to(dtype),
        pooled_prompt_embeds=pooled.to(dtype),
        negative_prompt_embeds=negative_embeds.to(dtype),
        negative_pooled_prompt_embeds=negative_pooled.to(dtype),
    )
