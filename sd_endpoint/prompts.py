"""AUTOMATIC1111's prompt syntax, and prompts of any length for the CLIP text encoder.

``parse`` reads the emphasis syntax that people paste from model sites; ``PromptEncoder``
turns a prompt and a negative prompt into the text embeddings the UNet attends to, the way
AUTOMATIC1111's web UI does:

* ``(word)`` multiplies the weight of its tokens by 1.1, ``((word))`` by 1.21, ``[word]``
  divides it by 1.1, ``(word:1.3)`` sets the factor; brackets nest and multiply. ``\\(``,
  ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are the literal characters. An unmatched ``)`` or
  ``]`` is plain text; an unclosed ``(`` or ``[`` weights the rest of the prompt. Nothing is
  ever a syntax error.
* ``BREAK`` (upper case, a word of its own) ends the current chunk.
* The tokens go into chunks of 75; each chunk becomes ``[bos] + chunk + [eos]``, padded to
  77 with the tokenizer's own pad token (``<|endoftext|>`` in SD 1.x, ``!`` in SD 2.x), and
  is encoded separately; the chunks' hidden states are concatenated along the sequence. A
  chunk that fills up moves the words after its last comma (if within 20 tokens of its end)
  to the next chunk, as the web UI does by default, so a phrase is not split.
* The shorter of prompt and negative prompt is padded with empty chunks (the encoding of
  ""), so both are as long.
* Each token's hidden state is multiplied by its weight, then the chunk is rescaled to its
  mean before weighting (the web UI's "Original" emphasis).
* ``clip_skip`` 2 takes the penultimate layer's hidden states through the final layer norm
  (an encoder built with ``final_norm=False`` takes them as they are, as SDXL reads them).

One deliberate difference: the web UI marks a ``BREAK`` with the weight -1, which brackets
around it then multiply, so that inside brackets it stops breaking and is read as the word
"BREAK" with a negative weight; here ``BREAK`` always breaks. The web UI also fails on a
weight such as ``(word:1.2.3)``; here that is text (``word:1.2.3`` with weight 1.1).

A prompt of one chunk without emphasis gives the same embeddings, bit for bit, as diffusers'
``StableDiffusionPipeline.encode_prompt``: same token ids, same batch of one, same dtype.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any

import torch

ROUND = 1.1
SQUARE = 1 / 1.1
# The web UI's default "prompt word wrap length limit".
COMMA_BACKTRACK = 20
# Weights past this (nesting a thousand brackets, or ``(word:1e300)`` written out in digits)
# overflow half precision and turn the image into NaNs; no prompt means them.
MAX_WEIGHT = 100.0

# The web UI's tokens, in its order; only the weight pattern is stricter (it accepts "1.2.3"
# and then fails to convert it).
_SYNTAX = re.compile(
    r"""
    \\\( | \\\) | \\\[ | \\\] | \\\\ | \\
    | \(
    | \[
    | :([+-]?(?:\d+\.?\d*|\.\d+))\)
    | \)
    | \]
    | [^\\()\[\]:]+
    | :
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")

Span = tuple[str, "float | None"]  # (text, weight); weight None marks a BREAK


def parse(text: str) -> list[Span]:
    """``text`` as (text, weight) spans; a ``("BREAK", None)`` span starts a new chunk.

    >>> parse("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    spans: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for span in spans[start:]:
            if span[1] is not None:
                span[1] *= factor

    for match in _SYNTAX.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            spans.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(spans))
        elif token == "[":
            square_open.append(len(spans))
        elif weight is not None and round_open:
            multiply_from(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            multiply_from(round_open.pop(), ROUND)
        elif token == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    spans.append(["BREAK", None])
                spans.append([part, 1.0])
    for start in round_open:
        multiply_from(start, ROUND)
    for start in square_open:
        multiply_from(start, SQUARE)
    if not spans:
        spans = [["", 1.0]]

    merged: list[list] = [spans[0]]
    for span in spans[1:]:
        last = merged[-1]
        if span[1] is not None and last[1] is not None and span[1] == last[1]:
            last[0] += span[0]
        else:
            merged.append(span)
    return [(text, weight) for text, weight in merged]


@dataclass(frozen=True)
class Chunk:
    """One text-encoder input: ``[bos] + up to 75 tokens + [eos]``, padded to 77."""

    ids: tuple[int, ...]
    weights: tuple[float, ...]

    @property
    def weighted(self) -> bool:
        return any(w != 1.0 for w in self.weights)


@dataclass(frozen=True)
class Tokenized:
    chunks: list[Chunk]
    tokens: int  # the prompt's own tokens, without the special and padding ones


@dataclass(frozen=True)
class Conditioning:
    """What the text encoder gives the pipeline for one request.

    The field names are the pipeline's own keyword arguments: a family whose pipeline takes
    more text inputs (SDXL's pooled embeddings) adds them as fields of a subclass.
    """

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None  # None without guidance

    def kwargs(self) -> dict[str, torch.Tensor | None]:
        """The pipeline call's text inputs, by keyword."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


class PromptTooLongError(ValueError):
    """A prompt needs more chunks than the limit allows; raised before any encoding."""


class PromptEncoder:
    """Prompts of any length, with emphasis, through one CLIP tokenizer and text encoder.

    ``final_norm``: whether the layer that ``clip_skip`` picks goes through the encoder's final
    layer norm, as the web UI does for SD 1.x and 2.x. SDXL reads its penultimate layer as it
    is, in the web UI as in diffusers.
    """

    def __init__(self, tokenizer, text_encoder, *, final_norm: bool = True):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.final_norm = final_norm
        self.length = min(
            tokenizer.model_max_length, text_encoder.config.max_position_embeddings
        )  # 77 for every Stable Diffusion 1.x/2.x
        self.chunk_tokens = self.length - 2
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        # SD 2.x's tokenizer pads with "!" (id 0), SD 1.x's with its end token; the encoder
        # was trained with its own, and any other changes every padded position.
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.comma = tokenizer.get_vocab().get(",</w>")
        self.layers = text_encoder.config.num_hidden_layers

    # -- tokens ---------------------------------------------------------------------------

    def tokenize(self, text: str) -> Tokenized:
        """``text`` (with emphasis and BREAKs) as chunks of token ids and weights."""
        spans = parse(text)
        texts = [t for t, w in spans if w is not None]
        # verbose=False: the tokenizer would warn that the ids exceed 77, which chunking handles.
        ids = iter(
            self.tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)[
                "input_ids"
            ]
            if texts
            else []
        )
        chunks: list[Chunk] = []
        tokens: list[int] = []
        weights: list[float] = []
        last_comma = -1
        count = 0

        def close() -> None:
            nonlocal tokens, weights, last_comma
            chunks.append(self._chunk(tokens, weights))
            tokens, weights, last_comma = [], [], -1

        for _, weight in spans:
            if weight is None:
                close()
                continue
            for token in next(ids):
                count += 1
                if token == self.comma:
                    last_comma = len(tokens)
                elif (
                    len(tokens) == self.chunk_tokens
                    and last_comma != -1
                    and len(tokens) - last_comma <= COMMA_BACKTRACK
                ):
                    # Move the words after the last comma to the next chunk, whole.
                    keep = last_comma + 1
                    moved_tokens, moved_weights = tokens[keep:], weights[keep:]
                    tokens, weights = tokens[:keep], weights[:keep]
                    close()
                    tokens, weights = moved_tokens, moved_weights
                if len(tokens) == self.chunk_tokens:
                    close()
                tokens.append(token)
                weights.append(weight)
        if tokens or not chunks:
            close()
        return Tokenized(chunks, count)

    def count_chunks(self, text: str) -> int:
        return len(self.tokenize(text).chunks)

    def _chunk(self, tokens: list[int], weights: list[float]) -> Chunk:
        padding = self.length - 2 - len(tokens)
        return Chunk(
            ids=(self.bos, *tokens, self.eos, *[self.pad] * padding),
            weights=(1.0, *weights, 1.0, *[1.0] * padding),
        )

    def empty_chunk(self) -> Chunk:
        return self._chunk([], [])

    # -- embeddings -----------------------------------------------------------------------

    def encode(
        self,
        prompt: str,
        negative_prompt: str | None,
        *,
        guided: bool,
        clip_skip: int = 1,
        max_chunks: int,
        names: tuple[str, str] = ("inputs", "negative_prompt"),
    ) -> Conditioning:
        """Embeddings of the prompt, and of the negative prompt when ``guided``.

        Both are ``(1, 77 * chunks, hidden)`` with the same number of chunks, in the text
        encoder's dtype on its device. Raises ``PromptTooLongError`` (a ``ValueError`` that
        names the field and counts its tokens, never quoting it) before any forward pass.
        """
        if clip_skip not in range(1, self.layers + 1):
            raise ValueError(f"clip_skip must be from 1 to {self.layers}, got {clip_skip}")
        positive = self.checked(prompt, names[0], max_chunks)
        # Checked even without guidance, so that a request is valid or not whatever its scale.
        negative = self.checked(negative_prompt or "", names[1], max_chunks)
        if not guided:
            return Conditioning(self.embed(positive.chunks, clip_skip), None)
        count = max(len(positive.chunks), len(negative.chunks))
        return Conditioning(
            self.embed(self.padded(positive.chunks, count), clip_skip),
            self.embed(self.padded(negative.chunks, count), clip_skip),
        )

    def checked(self, text: str, name: str, max_chunks: int) -> Tokenized:
        """``text`` tokenized, or a ``ValueError`` naming the field ``name`` if it takes more
        than ``max_chunks`` chunks or weighs a token absurdly."""
        tokenized = self.tokenize(text)
        chunks = len(tokenized.chunks)
        if chunks > max_chunks:
            raise PromptTooLongError(
                f"`{name}` has {tokenized.tokens:,} tokens, which take {chunks} chunks of "
                f"{self.chunk_tokens} (BREAK and commas near a chunk's end start a new one); "
                f"at most {max_chunks} chunks ({max_chunks * self.chunk_tokens} tokens) are "
                f"allowed: shorten `{name}`"
            )
        for chunk in tokenized.chunks:
            for weight in chunk.weights:
                if not abs(weight) <= MAX_WEIGHT:  # also catches inf and nan
                    raise ValueError(
                        f"`{name}` gives a token the emphasis weight {weight:.3g} (from nested "
                        f"brackets or `(text:weight)`); weights must be from -{MAX_WEIGHT:g} "
                        f"to {MAX_WEIGHT:g}"
                    )
        return tokenized

    def padded(self, chunks: list[Chunk], count: int) -> list[Chunk]:
        """``chunks`` followed by empty ones (the encoding of ""), ``count`` in all."""
        return chunks + [self.empty_chunk()] * (count - len(chunks))

    def embed(self, chunks: list[Chunk], clip_skip: int = 1) -> torch.Tensor:
        """The chunks of one prompt as one ``(1, 77 * len(chunks), hidden)`` sequence."""
        hidden = self.hidden(chunks, clip_skip)
        return hidden.reshape(1, len(chunks) * self.length, hidden.shape[-1])

    def hidden(self, chunks: list[Chunk], clip_skip: int = 1) -> torch.Tensor:
        """Each chunk through the text encoder, weighted: ``(len(chunks), 77, hidden)``, in
        one forward pass. Gradients flow when enabled (training uses this too)."""
        return self.encode_chunks(chunks, clip_skip)[0]

    def encode_chunks(self, chunks: list[Chunk], clip_skip: int = 1) -> tuple[torch.Tensor, Any]:
        """``hidden``'s states, and the text encoder's whole output for the same pass (its
        ``text_embeds``, with a projection, are the pooled embedding that SDXL uses)."""
        encoder = self.text_encoder
        ids = torch.tensor([c.ids for c in chunks], device=encoder.device)
        mask = None
        if getattr(encoder.config, "use_attention_mask", False):
            ends = [c.ids.index(self.eos) + 1 for c in chunks]
            mask = torch.tensor(
                [[1] * end + [0] * (self.length - end) for end in ends], device=encoder.device
            )
        if clip_skip == 1 and self.final_norm:
            output = encoder(ids, attention_mask=mask)
            hidden = output.last_hidden_state
        else:
            output = encoder(ids, attention_mask=mask, output_hidden_states=True)
            hidden = output.hidden_states[-clip_skip]
            if self.final_norm:
                # transformers 5.6 dropped the `text_model` wrapper that older versions (and
                # diffusers' own clip_skip) reach the final layer norm through.
                hidden = getattr(encoder, "text_model", encoder).final_layer_norm(hidden)
        weighted = [i for i, c in enumerate(chunks) if c.weighted]
        if weighted:
            hidden = self._emphasise(hidden, chunks, weighted)
        return hidden.to(dtype=encoder.dtype), output

    def _emphasise(self, hidden: torch.Tensor, chunks: list[Chunk], rows: list[int]):
        """Scale each token's hidden state by its weight, then restore the chunk's mean."""
        index = torch.tensor(rows, device=hidden.device)
        z = hidden[index].float()
        weights = torch.tensor([chunks[i].weights for i in rows], device=hidden.device)
        before = z.mean(dim=(1, 2), keepdim=True)
        z = z * weights[..., None]
        after = z.mean(dim=(1, 2), keepdim=True)
        # A mean of zero (weights that cancel out) would divide into infinities: left as is.
        usable = (after != 0) & torch.isfinite(after)
        z = torch.where(usable, z * (before / torch.where(usable, after, 1.0)), z)
        return hidden.index_copy(0, index, z.to(hidden.dtype))


def escape(text: str) -> str:
    """``text`` with every bracket and backslash escaped: it parses back to itself."""
    return re.sub(r"([\\()\[\]])", r"\\\1", text)
