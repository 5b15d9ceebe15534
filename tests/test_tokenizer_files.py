"""The shipped CLIP tokenizer files tokenize as CLIP's own tokenizer does.

The reference is OpenAI's ``SimpleTokenizer`` from the ``clip-anytorch`` package (installed
with ``--no-deps``: only its tokenizer module is loaded, never the package, which would import
torchvision). The files under ``model_tools/configs`` are derived from the same package by
``model_tools.clip_bpe``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import string
import sys
import unicodedata
from pathlib import Path

import pytest
import transformers
from transformers import CLIPTokenizer

from model_tools import clip_bpe
from model_tools.families import FAMILIES

CONFIGS = clip_bpe.CONFIGS
N_STRINGS = 3000
FAMILY_TOKENIZERS = [
    (family.key, encoder.tokenizer)
    for family in FAMILIES.values()
    for encoder in family.text_encoders
]


def load_reference():
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        if os.environ.get("CI"):
            pytest.fail("clip-anytorch is not installed (scripts/setup_env.sh installs it)")
        pytest.skip("clip-anytorch not installed: pip install --no-deps clip-anytorch==2.6.0")
    path = Path(next(iter(spec.submodule_search_locations))) / "simple_tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("clip_reference_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference():
    return load_reference()


PROMPT_WORDS = (
    "a photo of an astronaut riding a horse on mars, highly detailed, 8k, trending on "
    "artstation, masterpiece, best quality, portrait of a woman, oil painting by greg "
    "rutkowski and alphonse mucha, cinematic lighting, bokeh, 35mm, f/1.8, isn't it's "
    "we've they'll I'd you're unbelievably antidisestablishmentarianism CamelCaseWord "
    "café naïve Zürich São Paulo Łódź Ελληνικά русский 日本語の文章 中文字符 한국어 "
    "עברית العربية हिन्दी ไทย"
)
WORDS = PROMPT_WORDS.split()
EMOJI = ["😀", "🚀", "👩‍🚀", "🏳️‍🌈", "❤️", "👍🏽", "🐱", "✨", "🇯🇵", "🧑‍🎨"]
ODD = ["\t", "\n", "  ", "\u00a0", "’", "“", "”", "…", "—", "ﬁ", "Ａ", "&amp;", "&lt;", "\u200b"]


def a1111_prompt(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 8)):
        phrase = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
        style = rng.randint(0, 5)
        if style == 1:
            phrase = f"({phrase}:{rng.uniform(0.1, 2.0):.{rng.randint(1, 3)}f})"
        elif style == 2:
            phrase = "(" * rng.randint(1, 3) + phrase + ")" * rng.randint(1, 3)
        elif style == 3:
            phrase = f"[{phrase}]"
        elif style == 4:
            phrase = f"[{phrase}:{rng.choice(WORDS)}:{rng.randint(1, 30)}]"
        elif style == 5:
            phrase = f"<lora:{rng.choice(WORDS)}_v{rng.randint(1, 9)}:{rng.uniform(0, 1):.2f}>"
        parts.append(phrase)
    sep = rng.choice([", ", ",", " BREAK ", " AND ", " | "])
    return sep.join(parts)


def random_string(rng: random.Random) -> str:
    kind = rng.randrange(8)
    if kind == 0:
        return "".join(rng.choice(string.printable) for _ in range(rng.randint(0, 80)))
    if kind == 1:
        return "".join(rng.choice(string.punctuation + " ") for _ in range(rng.randint(1, 40)))
    if kind == 2:  # any assigned code point of the Basic Multilingual Plane
        chars = (
            chr(rng.choice([rng.randint(0x20, 0x2FF), rng.randint(0x370, 0xFFFF)]))
            for _ in range(30)
        )
        # Unassigned ones (as of Python's Unicode tables) are left out: CLIP's `regex` and the
        # Rust tokenizers carry different Unicode versions, and a letter added since is a
        # letter to one and not the other, whatever the vocabulary files say.
        return "".join(c for c in chars if unicodedata.category(c) not in ("Cn", "Cs"))
    if kind == 3:
        return " ".join(rng.choice(EMOJI + WORDS) for _ in range(rng.randint(1, 12)))
    if kind == 4:  # one long word: many merges, and more than 77 tokens
        return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(20, 120)))
    if kind == 5:
        numbers = [str(rng.randint(0, 10 ** rng.randint(1, 12))) for _ in range(rng.randint(1, 6))]
        return rng.choice([" ", ", ", "x", ".", "-"]).join(numbers)
    if kind == 6:
        return "".join(rng.choice(WORDS + ODD + EMOJI + [" "]) for _ in range(rng.randint(1, 20)))
    return a1111_prompt(rng)


@pytest.fixture(scope="module")
def strings():
    rng = random.Random(20261126)
    return [random_string(rng) for _ in range(N_STRINGS)] + [
        "",
        "<|startoftext|>",
        "!!!",
        "a " * 100,
    ]


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"]


def tokenizer_classes():
    classes = [CLIPTokenizer]
    fast = getattr(transformers, "CLIPTokenizerFast", None)
    if fast is not None and fast is not CLIPTokenizer:  # transformers 4.x: slow and fast
        classes.append(fast)
    return classes


def is_python_tokenizer(cls) -> bool:
    return cls.__name__ == "CLIPTokenizer" and not getattr(cls, "is_fast", False)


@pytest.fixture(autouse=True)
def quiet_length_warnings():
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity_warning()


def test_vocab_and_merges_are_clips_own(reference):
    ref = reference.SimpleTokenizer()
    vocab = json.loads((CONFIGS / "sd1" / "tokenizer" / "vocab.json").read_text("utf-8"))
    assert vocab == ref.encoder
    merges = (CONFIGS / "sd1" / "tokenizer" / "merges.txt").read_text("utf-8").splitlines()
    assert merges[0] == "#version: 0.2"
    assert [tuple(m.split()) for m in merges[1:]] == sorted(ref.bpe_ranks, key=ref.bpe_ranks.get)


def test_derivation_reproduces_the_shipped_files(reference, tmp_path):
    clip_bpe.write_tokenizers(clip_bpe.read_merges(), tmp_path)
    for family, tokenizer in FAMILY_TOKENIZERS:
        for name in (
            "vocab.json",
            "merges.txt",
            "special_tokens_map.json",
            "tokenizer_config.json",
        ):
            shipped = CONFIGS / family / tokenizer / name
            assert (tmp_path / family / tokenizer / name).read_bytes() == shipped.read_bytes()


@pytest.mark.parametrize("cls", tokenizer_classes(), ids=lambda c: c.__name__)
def test_tokenizes_like_clip_on_varied_strings(reference, strings, cls):
    ref = reference.SimpleTokenizer()
    tokenizer = cls.from_pretrained(CONFIGS / "sd1" / "tokenizer")
    mismatches = []
    for text in strings:
        expected = ref.encode(text)
        if not is_python_tokenizer(cls):
            # The Rust tokenizers skip CLIP's ftfy/HTML clean-up (their normaliser is NFC,
            # whitespace and lower case): compare them on text already cleaned that way.
            text = reference.whitespace_clean(reference.basic_clean(text))
        if ids(tokenizer, text) != expected:
            mismatches.append(text)
    assert not mismatches, f"{len(mismatches)} of {len(strings)} differ, e.g. {mismatches[:3]!r}"


@pytest.mark.parametrize(
    "family, folder, pad_id",
    [
        ("sd1", "tokenizer", 49407),
        ("sd2", "tokenizer", 0),
        ("sdxl", "tokenizer", 49407),  # CLIP ViT-L's, as SD 1.x's
        ("sdxl", "tokenizer_2", 0),  # OpenCLIP ViT-bigG's, as SD 2.x's
    ],
)
@pytest.mark.parametrize("cls", tokenizer_classes(), ids=lambda c: c.__name__)
def test_family_pads_with_its_own_token(family, folder, pad_id, cls):
    tokenizer = cls.from_pretrained(CONFIGS / family / folder)
    out = tokenizer("a red cube", padding="max_length", max_length=77)["input_ids"]
    assert len(out) == 77 and tokenizer.model_max_length == 77
    assert out[0] == 49406 and out[4] == 49407  # <|startoftext|> a red cube <|endoftext|>
    assert set(out[5:]) == {pad_id}
    assert tokenizer.pad_token_id == pad_id


def test_every_tokenizer_shares_the_vocabulary_files():
    for name in clip_bpe.SHARED_FILES:
        sd1 = CONFIGS / "sd1" / "tokenizer" / name
        for family, tokenizer in FAMILY_TOKENIZERS:
            assert (CONFIGS / family / tokenizer / name).read_bytes() == sd1.read_bytes()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
