"""Tokenizer: GGUF and Hugging Face builds, chat templates, end-of-generation ids, streaming."""

import json
from pathlib import Path
from typing import Any

import pytest
from tokenizers import AddedToken, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend
from tokenizers import decoders as tk_decoders

from shoal.errors import BadRequest, UnsupportedModel
from shoal.models.gguf import GGUFSource
from shoal.models.tokenizer import FALLBACK_CHAT_TEMPLATE, Tokenizer
from tests.helpers.smollm2 import SMOLLM_DIR, SMOLLM_FILE

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
FRANCE_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
# The ids transformers' GGUF tokenizer gives (AutoTokenizer.from_pretrained(dir, gguf_file=)).
# fmt: off
GOLDEN = {
    "Hello, world!": [19556, 28, 905, 17],
    "  leading spaces and trailing  ": [216, 2899, 5600, 284, 35079, 256],
    "It's 2024; pi≈3.14159, x=42.": [
        1589, 506, 216, 34, 32, 34, 36, 43, 16916, 40533, 226, 35, 30, 33, 36, 33, 37, 41, 28,
        1792, 45, 36, 34, 30,
    ],
    "line one\nline two\n\n\tTabbed": [1311, 582, 198, 1311, 827, 1116, 197, 30064, 5776],
    "naïve café — déjà vu": [3546, 46494, 37366, 1841, 32564, 90, 16739, 386, 101],
    "日本語のテキスト": [
        23274, 115, 40993, 179, 120, 248, 26453, 11100, 224, 10391, 251, 10391, 134, 11100, 226,
    ],
    "emoji 🤖👍🏽 mix": [391, 33777, 15107, 114, 240, 10813, 235, 231, 10813, 233, 138, 3412],
    "<|im_start|>user\nhi<|im_end|>\n": [1, 4093, 198, 6004, 2, 198],
    "don't STOP": [12420, 982, 5022, 7627],
}
# fmt: on
EXTRA_STRINGS = [
    "",
    " ",
    "\n",
    "a  b\n\n c",
    "x=(a+b);\n",
    "12345678901234567890",
    "I'LL",
    "<|endoftext|>",
]


@pytest.fixture(scope="module")
def smollm() -> Tokenizer:
    return GGUFSource(SMOLLM_DIR / SMOLLM_FILE).tokenizer()


def stream_all(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    decoder = tokenizer.stream()
    return [decoder.push(i) for i in ids] + [decoder.flush()]


# --- SmolLM2's GGUF tokenizer -----------------------------------------------------------------


@pytest.mark.parametrize("text", list(GOLDEN))
def test_smollm2_encodes_like_transformers(smollm: Tokenizer, text: str) -> None:
    assert smollm.encode(text) == GOLDEN[text]
    assert smollm.decode(GOLDEN[text], skip_special_tokens=False) == text


def test_smollm2_special_tokens_and_ids(smollm: Tokenizer) -> None:
    assert [smollm.encode(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [
        [0],
        [1],
        [2],
    ]
    assert smollm.decode([1, 4093, 198, 6004, 2]) == "user\nhi"
    # The file declares bos 1 (<|im_start|>) and eos 2 (<|im_end|>) and add_bos_token false.
    assert (smollm.bos_token_id, smollm.bos_token, smollm.add_bos) == (1, "<|im_start|>", False)
    assert smollm.eos_token == "<|im_end|>" and smollm.eos_token_ids == {0, 2}
    assert smollm.encode("hi", add_special_tokens=True) == smollm.encode("hi")
    assert smollm.vocab_size == 49152
    assert smollm.token_text(905) == " world" and smollm.token_text(2) == "<|im_end|>"


def test_smollm2_chat_prompt(smollm: Tokenizer) -> None:
    assert smollm.has_chat_template
    assert smollm.render_chat(FRANCE) == FRANCE_PROMPT
    ids = smollm.encode_chat(FRANCE)
    assert ids == smollm.encode(FRANCE_PROMPT) and ids[:1] == [1] and ids.count(1) == 3
    assert smollm.render_chat(FRANCE, add_generation_prompt=False) == FRANCE_PROMPT.removesuffix(
        "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("text", ["héllo 你好 🤖 done", "👍🏽👍🏽 日本語のテキスト", "🤖"])
def test_stream_never_yields_broken_utf8(smollm: Tokenizer, text: str) -> None:
    ids = smollm.encode(text)
    chunks = stream_all(smollm, ids)
    assert "".join(chunks) == text
    assert all("\ufffd" not in c for c in chunks)
    assert "" in chunks[:-1]  # some token held back half a character


def test_stream_skips_special_tokens_and_flushes(smollm: Tokenizer) -> None:
    ids = smollm.encode("<|im_start|>assistant\nThe capital is Paris.<|im_end|>")
    assert "".join(stream_all(smollm, ids)) == "assistant\nThe capital is Paris."
    decoder = smollm.stream()
    partial = smollm.encode("🤖")[:-1]
    assert [decoder.push(i) for i in partial] == [""] * len(partial)
    assert decoder.flush() == smollm.decode(partial)  # incomplete, but asked for
    assert decoder.push(smollm.encode("ok")[0]) == "ok"


# --- byte-level pre-tokenizers ----------------------------------------------------------------


def byte_level(pre: str) -> Tokenizer:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    return Tokenizer.from_gguf(
        {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": alphabet,
        }
    )


@pytest.mark.parametrize(
    "pre,expected",
    [
        ("default", ["Hello", "Ġ", "Ġworld", "Ġ12345", "Ċ", "Ċ", "I", "'", "LL", "Ġgo"]),
        (
            "smollm",
            ["Hello", "Ġ", "Ġworld", "Ġ", "1", "2", "3", "4", "5", "Ċ", "Ċ", "I", "'", "LL", "Ġgo"],
        ),
        ("llama-bpe", ["Hello", "Ġ", "Ġworld", "Ġ", "123", "45", "ĊĊ", "I", "'LL", "Ġgo"]),
        ("qwen2", ["Hello", "Ġ", "Ġworld", "Ġ", "1", "2", "3", "4", "5", "ĊĊ", "I", "'LL", "Ġgo"]),
    ],
)
def test_pre_tokenizer_splits(pre: str, expected: list[str]) -> None:
    pieces = byte_level(pre).backend.pre_tokenizer.pre_tokenize_str("Hello  world 12345\n\nI'LL go")
    assert [p for p, _ in pieces] == expected


def test_byte_level_round_trips_without_merges() -> None:
    tok = byte_level("llama-bpe")
    text = "naïve 🤖\n\tx"
    assert len(tok.encode(text)) == len(text.encode())
    assert tok.decode(tok.encode(text)) == text


# --- SentencePiece-style GGUF vocabularies ----------------------------------------------------

PIECES = ["▁", "h", "e", "l", "o", "w", "r", "d", "!", "he", "ll", "or", "ld", "llo", "wor"]
PIECES += ["hello", "world", "▁hello", "▁world"]


def spm_fields(**overrides: Any) -> dict[str, Any]:
    tokens = ["<unk>", "<s>", "</s>", "<|im_end|>", "<think>"]
    tokens += [f"<0x{b:02X}>" for b in range(256)] + PIECES
    types = [2, 3, 3, 3, 4] + [6] * 256 + [1] * len(PIECES)
    scores = [0.0] * 261 + [-float(len(p)) for p in PIECES]  # shorter pieces merge first
    fields = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    return fields | overrides


def test_sentencepiece_merges_bytes_and_spaces() -> None:
    tok = Tokenizer.from_gguf(spm_fields())

    def piece(token: str) -> int:
        found = tok.backend.token_to_id(token)
        assert found is not None, token
        return found

    assert tok.encode("hello world") == [piece("▁hello"), piece("▁world")]
    assert tok.decode(tok.encode("hello world")) == "hello world"
    assert tok.encode("hé") == [piece("▁"), piece("h"), piece("<0xC3>"), piece("<0xA9>")]
    assert tok.decode(tok.encode("hé world!")) == "hé world!"
    assert tok.add_bos and tok.encode("hello", add_special_tokens=True)[0] == 1
    assert tok.eos_token_ids == {2, 3}
    assert tok.encode("<think>hello</s>") == [4, piece("▁hello"), 2]
    assert tok.encode("  hello") == [piece("▁"), piece("▁"), piece("▁hello")]  # as llama.cpp does
    assert tok.decode([4, piece("▁hello"), 2]) == "<think> hello"
    assert "".join(stream_all(tok, tok.encode("hé world"))) == "hé world"
    assert stream_all(tok, tok.encode("é"))[:3] == ["", "", "é"]  # ▁, <0xC3>, <0xA9>


def test_sentencepiece_without_space_prefix() -> None:
    tok = Tokenizer.from_gguf(spm_fields(**{"tokenizer.ggml.add_space_prefix": False}))
    piece = tok.backend.token_to_id
    assert tok.encode("hello world") == [piece("hello"), piece("▁world")]
    assert tok.decode(tok.encode("hello world")) == "hello world"


def test_unknown_gguf_tokenizer_model() -> None:
    with pytest.raises(UnsupportedModel, match="'t5'"):
        Tokenizer.from_gguf({"tokenizer.ggml.model": "t5", "tokenizer.ggml.tokens": ["a"]})


# --- chat templates ---------------------------------------------------------------------------


def test_template_errors_are_bad_requests() -> None:
    tok = Tokenizer.from_gguf(
        spm_fields(**{"tokenizer.chat_template": "{{ raise_exception('no system role') }}"})
    )
    with pytest.raises(BadRequest, match="no system role"):
        tok.render_chat(FRANCE)
    tok = Tokenizer.from_gguf(spm_fields(**{"tokenizer.chat_template": "{% for %}"}))
    with pytest.raises(BadRequest):
        tok.render_chat(FRANCE)
    tok = Tokenizer.from_gguf(
        spm_fields(**{"tokenizer.chat_template": "{{ messages[0].content + 1 }}"})
    )
    with pytest.raises(BadRequest):
        tok.render_chat(FRANCE)


def test_template_helpers_and_fallback() -> None:
    template = (
        "{{ bos_token }}{{ messages | tojson }}|{{ strftime_now('%Y') | length }}|{{ eos_token }}"
    )
    tok = Tokenizer.from_gguf(spm_fields(**{"tokenizer.chat_template": template}))
    assert (
        tok.render_chat([{"role": "user", "content": "é"}])
        == '<s>[{"role": "user", "content": "é"}]|4|</s>'
    )
    assert tok.encode_chat([{"role": "user", "content": "é"}]).count(1) == 1  # BOS not doubled
    plain = Tokenizer.from_gguf(spm_fields())
    assert not plain.has_chat_template and plain.chat_template == FALLBACK_CHAT_TEMPLATE
    assert plain.render_chat(FRANCE) == (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert plain.encode_chat(FRANCE)[0] == 1  # the vocabulary wants BOS; the prompt lacks it


# --- Hugging Face directories -----------------------------------------------------------------


def write_hf_tokenizer(path: Path, config: dict[str, Any], *, bos_processor: bool = False) -> None:
    """A byte-level tokenizer.json with a few merges and ChatML/llama special tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "w")]
    vocab = {t: i for i, t in enumerate(alphabet + ["he", "ll", "hell", "hello", "Ġw"])}
    backend = Backend(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tk_decoders.ByteLevel()
    specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|eot_id|>"]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if bos_processor:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))]
        )
    path.mkdir(exist_ok=True)
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def test_hf_directory(tmp_path: Path) -> None:
    template = (
        "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"
    )
    config = {
        "bos_token": "<s>",
        "eos_token": {"content": "</s>"},
        "add_bos_token": True,
        "chat_template": template,
    }
    write_hf_tokenizer(tmp_path, config)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [257, 260]}))
    tok = Tokenizer.from_hf_dir(tmp_path)
    bos, eos, im_start, im_end, eot = (
        tok.backend.token_to_id(t)
        for t in ("<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|eot_id|>")
    )
    assert (tok.bos_token_id, tok.bos_token, tok.eos_token, tok.add_bos) == (
        bos,
        "<s>",
        "</s>",
        True,
    )
    assert tok.eos_token_ids == {eos, im_end, eot, 257, 260}
    assert tok.encode("hello world") == [
        tok.backend.token_to_id("hello"),
        tok.backend.token_to_id("Ġw"),
        *tok.encode("orld"),
    ]
    assert tok.encode("hi", add_special_tokens=True)[0] == bos
    ids = tok.encode_chat([{"role": "user", "content": "hello"}])
    assert ids[:3] == [bos, im_start, tok.backend.token_to_id("hello")] and ids.count(bos) == 1
    assert tok.decode(ids) == "hello"


def test_hf_directory_defaults(tmp_path: Path) -> None:
    write_hf_tokenizer(tmp_path / "a", {"bos_token": "<s>"}, bos_processor=True)
    (tmp_path / "a" / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    a = Tokenizer.from_hf_dir(tmp_path / "a")
    assert a.add_bos and a.encode("x") == a.encode("x", add_special_tokens=False)  # BOS is ours
    assert a.render_chat(FRANCE) == FRANCE[0]["content"]
    write_hf_tokenizer(tmp_path / "b", {"bos_token": "<s>"})
    b = Tokenizer.from_hf_dir(tmp_path / "b")
    assert not b.add_bos and not b.has_chat_template


# --- against transformers ---------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(SMOLLM_DIR, gguf_file=SMOLLM_FILE)
    for text in [*GOLDEN, *EXTRA_STRINGS]:
        assert smollm.encode(text) == theirs.encode(text, add_special_tokens=False), text
        assert smollm.encode(text, add_special_tokens=True) == theirs.encode(text), text
    prompt = theirs.apply_chat_template(FRANCE, tokenize=False, add_generation_prompt=True)
    assert smollm.render_chat(FRANCE) == prompt
    assert (
        theirs.eos_token_id in smollm.eos_token_ids and theirs.bos_token_id == smollm.bos_token_id
    )
