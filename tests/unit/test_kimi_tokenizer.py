"""Kimi K2's tokenizer directory (tiktoken.model + tokenizer_config.json) read by Tokenizer.

The vocabulary is made here: the 256 bytes and a few hundred merges learnt from a small text,
written as tiktoken's base64 rank lines, with Kimi's special tokens in tokenizer_config.json.
The reference is tiktoken itself, built as tokenization_kimi.py builds it.
"""

import base64
import json
from collections import Counter
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from shoal.errors import UnsupportedModel
from shoal.models.tokenizer import Tokenizer

tiktoken = pytest.importorskip("tiktoken")

# tokenization_kimi.py's pat_str, copied as Kimi K2 ships it
PAT_STR = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",  # noqa: E501
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",  # noqa: E501
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
CORPUS = (
    "The quick brown fox jumps over the lazy dog. It's what they'll say, isn't it? "
    "Hello world, hello tokens: 12345 and 678. The theory of the thing is that the "
    "tokenizer learns the merges of the most frequent pairs. 你好世界，今天天气很好。"
) * 3
N_MERGES = 300  # at most: as many as the text has pairs to merge
SPECIALS = {0: "[BOS]", 1: "[EOS]", 4: "<|im_end|>", 5: "<|im_user|>", 6: "<|im_assistant|>"}
TEMPLATE = (
    "{% for m in messages %}<|im_{{ m.role }}|>{{ m.content }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_assistant|>{% endif %}"
)
TEXTS = [
    "Hello world! It's THE theory, they'LL see.",
    "你好世界，今天天气很好。 mixed 中文 and English",
    "numbers 1234567 and 3.14159\n\n\n   indented\ttabs  ",
    "emoji 🙂🚀 and accents café naïve",
    "a special [BOS] inside<|im_end|> text",
    "",
]


@cache
def byte_pair_ranks() -> dict[bytes, int]:
    """The 256 bytes, then N_MERGES merges of the most frequent adjacent pairs in CORPUS."""
    ranks = {bytes([b]): b for b in range(256)}
    words = [[bytes([b]) for b in w.encode()] for w in CORPUS.split(" ")]
    while len(ranks) < 256 + N_MERGES:
        pairs = Counter((a, b) for w in words for a, b in zip(w, w[1:], strict=False))
        pairs = Counter({p: c for p, c in pairs.items() if p[0] + p[1] not in ranks})
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        ranks[a + b] = len(ranks)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == a and w[i + 1] == b:
                    w[i : i + 2] = [a + b]
                i += 1
    return ranks


@pytest.fixture(scope="module")
def kimi_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("kimi")
    ranks = byte_pair_ranks()
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in ranks.items()]
    (path / "tiktoken.model").write_text("\n".join(lines) + "\n")
    n = len(ranks)
    config = {
        "added_tokens_decoder": {
            str(n + i): {"content": t, "special": True} for i, t in SPECIALS.items()
        },
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "chat_template": TEMPLATE,
        "tokenizer_class": "TikTokenTokenizer",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": n + 4}))
    (path / "tokenization_kimi.py").write_text(f"pat_str = {PAT_STR!r}\n")  # as shipped
    return path


@pytest.fixture(scope="module")
def reference(kimi_dir: Path) -> Any:
    """tiktoken's Encoding, as tokenization_kimi.py makes it."""
    ranks = byte_pair_ranks()
    n = len(ranks)
    named = {n + i: t for i, t in SPECIALS.items()}
    specials = {named.get(i, f"<|reserved_token_{i}|>"): i for i in range(n, n + 256)}
    return tiktoken.Encoding(
        "kimi", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=specials
    )


@pytest.fixture(scope="module")
def kimi(kimi_dir: Path) -> Tokenizer:
    return Tokenizer.from_hf_dir(kimi_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_encodes_and_decodes_like_tiktoken(kimi: Tokenizer, reference: Any, text: str) -> None:
    ids = kimi.encode(text)
    assert ids == reference.encode(text, allowed_special="all")
    assert kimi.decode(ids, skip_special_tokens=False) == text
    assert len(ids) < len(text.encode()) or not text  # the merges are used


def test_special_tokens(kimi: Tokenizer, reference: Any) -> None:
    n = len(byte_pair_ranks())
    assert n > 256 + 100  # a few hundred ranks, merges included
    assert kimi.vocab_size == reference.n_vocab == n + 256
    assert (kimi.bos_token, kimi.bos_token_id, kimi.eos_token) == ("[BOS]", n, "[EOS]")
    assert not kimi.add_bos  # Kimi's tokenizer adds no BOS; its chat template has none
    assert kimi.eos_token_ids == {n + 1, n + 4}  # [EOS], and <|im_end|> (generation_config)
    assert kimi.token_text(n + 7) == f"<|reserved_token_{n + 7}|>"
    ids = kimi.encode("hi<|im_end|>")
    assert ids[-1] == n + 4
    assert kimi.decode(ids) == "hi"  # special tokens skipped by default


def test_stream_never_yields_broken_utf8(kimi: Tokenizer) -> None:
    text = "你好🙂 café"
    decoder = kimi.stream()
    pieces = [decoder.push(i) for i in kimi.encode(text)]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + decoder.flush() == text


def test_chat_template_from_the_config_or_its_own_file(kimi_dir: Path, tmp_path: Path) -> None:
    messages = [{"role": "user", "content": "hi"}]
    assert Tokenizer.from_hf_dir(kimi_dir).render_chat(messages) == (
        "<|im_user|>hi<|im_end|><|im_assistant|>"
    )
    copy = tmp_path / "kimi"
    copy.mkdir()
    for file in kimi_dir.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    (copy / "chat_template.jinja").write_text("{{ messages[0].content }}!")
    assert Tokenizer.from_hf_dir(copy).render_chat(messages) == "hi!"


def test_a_directory_without_a_vocabulary_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModel, match="tiktoken.model"):
        Tokenizer.from_hf_dir(tmp_path)
