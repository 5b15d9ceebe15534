"""The trained toy models, one per model family: what training them differs in.

``model_tools.train`` runs one training loop for every family; a ``Toy`` gives it the family's
make-up (build, save), its default folder, and its text side: the text encoders trained with the
UNet and how a batch of captions becomes the UNet's text inputs. The captions are encoded by
the endpoint's own prompt encoder for the family (``Family.prompt_encoder``), so training sees
the 75-token chunks, padding tokens and layers that serving gives the UNet.

* ``sd``: the shipped model in the repository's root (``architecture.tiny``).
* ``sdxl``: ``tests/models/sdxl`` (``tiny_sdxl.toy``), a test model of the SDXL path. Its
  captions go through both encoders, joined per token, with bigG's pooled embedding of the
  first chunk and the size numbers (``time_ids``); a dropped caption is zeros, states and
  pooled alike, as SDXL serves an empty negative prompt; a further share of the kept captions
  loses the pooled embedding alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, SimpleNamespace
from typing import Any

import numpy as np
import torch
from transformers import CLIPTokenizer

from sd_endpoint.families import SD, SDXL, Family
from sd_endpoint.families.sdxl import NATIVE_LAYER
from sd_endpoint.prompts import Chunk, PromptEncoder

from . import architecture, tiny_sdxl

REPO_ROOT = Path(__file__).resolve().parent.parent
# Sizes (a side, in pixels) the SDXL toy's size conditioning is trained with; see XLText.
TRAINED_SIDES = tuple(range(64, 1537, 64))


class ChunkCache:
    """Each caption's chunks, tokenized once: most captions repeat."""

    def __init__(self, encoder: PromptEncoder):
        self.encoder = encoder
        self.chunks: dict[str, list[Chunk]] = {}

    def __getitem__(self, text: str) -> list[Chunk]:
        if text not in self.chunks:
            self.chunks[text] = self.encoder.tokenize(text).chunks
        return self.chunks[text]

    def rows(self, texts: list[str], count: int) -> list[list[Chunk]]:
        """Each text's chunks, padded with empty ones to ``count``."""
        return [self.encoder.padded(self[t], count) for t in texts]


def padding_mask(counts: list[int], count: int, length: int) -> torch.Tensor:
    """1 over each caption's own chunks, 0 over the padding that evens out the batch: a short
    caption trains as it is served, alone (a first run that let 2-3 padded chunks dilute the
    attention of most short captions drew every colourless prompt blue and ignored negative
    prompts)."""
    return torch.tensor([[1.0] * n + [0.0] * (count - n) for n in counts]).repeat_interleave(
        length, dim=1
    )


def encode_rows(encoder: PromptEncoder, rows: list[list[Chunk]], layer: int):
    """Each distinct chunk through the encoder once (most captions are short and many repeat,
    and the padding is all one chunk): the rows' states ``(len(rows), count, 77, width)``, the
    index of each row's chunks into the distinct ones, and the encoder's output for them."""
    unique = list(dict.fromkeys(chunk for row in rows for chunk in row))
    position = {chunk: i for i, chunk in enumerate(unique)}
    index = torch.tensor([[position[chunk] for chunk in row] for row in rows])
    hidden, output = encoder.encode_chunks(unique, layer)
    return hidden[index], index, output


class SDText:
    """SD's text side: one CLIP encoder, read at its last layer; a dropped caption is "",
    encoded, as the pipeline encodes an empty negative prompt."""

    def __init__(self, modules: dict[str, torch.nn.Module], out: Path):
        architecture.write_tokenizer(out / "tokenizer")
        tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
        self.modules = {"text_encoder": modules["text_encoder"]}
        pipe = SimpleNamespace(tokenizer=tokenizer, text_encoder=modules["text_encoder"])
        self.encoder: PromptEncoder = SD.prompt_encoder(pipe)
        self.cache = ChunkCache(self.encoder)

    def embed(self, texts: list[str], rng: np.random.Generator):
        """The captions' states, the shorter ones padded to the batch's longest, the mask that
        hides the padding from the UNet, and no further UNet inputs."""
        counts = [len(self.cache[t]) for t in texts]
        count = max(counts)
        states, _, _ = encode_rows(self.encoder, self.cache.rows(texts, count), layer=1)
        length = self.encoder.length
        return (
            states.reshape(len(texts), count * length, states.shape[-1]),
            padding_mask(counts, count, length),
            {},
        )


class XLText:
    """SDXL's text side, encoded by the endpoint's ``XLPromptEncoder``'s two encoders.

    The size numbers (original = target size, crop 0,0, as the endpoint sends them) are drawn
    at random from ``TRAINED_SIDES`` for every picture: the synthetic world looks the same at
    every size, so the toy learns that they change nothing, and serves any requested size as it
    serves its native one.

    Besides the dropped captions (all zeros), a share ``pooled_dropout`` of the kept ones
    (0.3 for the committed toy) loses the pooled embedding alone, to zeros, the token states
    kept, so that those must carry the prompt through cross-attention: the pooled embedding,
    added to the time embedding of every block, otherwise lets the toy follow its prompts
    without guidance, and guidance 7.5 overshoots (docs/model.md, "The SDXL toy").
    """

    def __init__(
        self,
        modules: dict[str, torch.nn.Module],
        out: Path,
        pooled_dropout: float = 0.0,
    ):
        self.pooled_dropout = pooled_dropout
        tiny_sdxl.write_tokenizers(out)
        pipe = SimpleNamespace(
            tokenizer=CLIPTokenizer.from_pretrained(out / "tokenizer"),
            tokenizer_2=CLIPTokenizer.from_pretrained(out / "tokenizer_2"),
            text_encoder=modules["text_encoder"],
            text_encoder_2=modules["text_encoder_2"],
            config={"force_zeros_for_empty_prompt": True},
        )
        self.modules = {name: modules[name] for name in ("text_encoder", "text_encoder_2")}
        self.encoder = SDXL.prompt_encoder(pipe)  # an XLPromptEncoder
        self.caches = [ChunkCache(encoder) for encoder in self.encoder.encoders]

    def embed(self, texts: list[str], rng: np.random.Generator):
        """As ``SDText.embed``, with bigG's pooled embedding of each caption's first chunk and
        the size numbers as the UNet's ``added_cond_kwargs``."""
        counts = [len(self.caches[0][t]) for t in texts]
        if counts != [len(self.caches[1][t]) for t in texts]:
            raise ValueError("the two tokenizers split a caption into different chunks")
        count = max(counts)
        kept = torch.tensor([1.0 if t else 0.0 for t in texts])
        keep_pooled = kept * self._survivors(self.pooled_dropout, rng, len(texts))
        states = []
        for cache in self.caches:
            hidden, index, output = encode_rows(
                cache.encoder, cache.rows(texts, count), NATIVE_LAYER
            )
            states.append(hidden)
        # `output` is text_encoder_2's: its projected end-token states, one per distinct chunk.
        pooled = output.text_embeds[index[:, 0]]
        joined = torch.cat(states, dim=-1)
        joined = joined.reshape(len(texts), count * self.encoder.length, joined.shape[-1])
        joined = joined * kept[:, None, None]
        sides = rng.choice(TRAINED_SIDES, size=(len(texts), 2))
        time_ids = torch.tensor(
            [[h, w, 0, 0, h, w] for h, w in sides.tolist()], dtype=torch.float32
        )
        pooled = pooled * keep_pooled[:, None]
        extra = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
        return joined, padding_mask(counts, count, self.encoder.length), extra

    @staticmethod
    def _survivors(share: float, rng: np.random.Generator, count: int) -> torch.Tensor:
        """1 for each of ``count`` rows that a dropout of ``share`` keeps, else 0. No draw when
        ``share`` is 0, so a recipe without it trains as it did before the option existed."""
        if not share:
            return torch.ones(count)
        return torch.from_numpy(rng.random(count) >= share).float()


@dataclass(frozen=True)
class Toy:
    family: Family
    folder: Path  # where `model_tools.train` writes it unless told otherwise
    architecture: Callable[[], Any]
    build: Callable[[Any, int], dict[str, torch.nn.Module]]
    save: Callable[[dict[str, torch.nn.Module], Any, Path, torch.dtype], Any]
    # Writes the tokenizers into the folder and returns the text side (SDText or XLText),
    # given the `text_options` as keywords.
    text_side: Callable[..., SDText | XLText]
    # `model_tools.train` options whose defaults differ for this toy, by option name.
    training: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    # `model_tools.train` options only this toy's text side has (refused for the others).
    text_options: tuple[str, ...] = ()


TOYS = {
    "sd": Toy(
        family=SD,
        folder=REPO_ROOT,
        architecture=lambda: architecture.tiny(len(architecture.char_vocab())),
        build=architecture.build,
        save=architecture.save,
        text_side=SDText,
    ),
    "sdxl": Toy(
        family=SDXL,
        folder=REPO_ROOT / "tests" / "models" / "sdxl",
        architecture=tiny_sdxl.toy,
        build=tiny_sdxl.build,
        save=tiny_sdxl.save,
        text_side=XLText,
        text_options=("pooled_dropout",),
        # Fewer steps than the shipped model's: its ~35 minutes on one thread of a shared
        # 2-core machine, where an SDXL toy's UNet step (two encoders, the add-embedding)
        # costs about 1.4x the shipped model's. More caption dropout than the shipped model's
        # 10%, and the pooled embedding dropped on its own, so that guidance has something
        # to add: with the SD defaults the toy follows its prompts unguided and guidance 7.5
        # over-guides it (docs/model.md, "The SDXL toy").
        training=MappingProxyType(
            {"vae_steps": 600, "unet_steps": 2600, "caption_dropout": 0.4, "pooled_dropout": 0.3}
        ),
    ),
}
