"""Text to token ids and back, the model's chat template, and streaming detokenization.

A `Tokenizer` wraps a `tokenizers.Tokenizer` built either from GGUF metadata (byte-level BPE for
`tokenizer.ggml.model == "gpt2"`, SentencePiece-style BPE with byte fallback for `"llama"`) or from
a Hugging Face directory (tokenizer.json + tokenizer_config.json), or a tiktoken vocabulary where
a directory has tiktoken.model instead (Kimi K2: models/tiktoken_codec.py). BOS is added by this
class, never by the backend's post-processor, so every kind behaves alike.
"""

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

from shoal.errors import BadRequest, UnsupportedModel

if TYPE_CHECKING:
    from shoal.models.tiktoken_codec import TiktokenCodec

log = logging.getLogger(__name__)

# Tokens that end a turn in common chat formats. Like llama.cpp, generation stops at any of them
# that the vocabulary holds as a special token, whatever the declared EOS says.
END_OF_GENERATION = (
    "<|im_end|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<end_of_turn>",
    "<|end|>",
    "<|EOT|>",
    "<EOT>",
    "<end_of_utterance>",
    "<|return|>",
    "</s>",
)

# Used when a model brings no chat template: ChatML, which most small chat models understand.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# How llama.cpp splits text before byte-level BPE, keyed by `tokenizer.ggml.pre`.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_CONTRACTIONS = r"'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD]"
_LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (_GPT2,),
    "gpt2": (_GPT2,),
    "gpt-2": (_GPT2,),
    **dict.fromkeys(("smollm", "starcoder", "refact", "codeshell"), (r"\p{N}", _GPT2)),
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "falcon3"), (_LLAMA3,)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), (_QWEN2,)),
}
_IGNORE_MERGES = frozenset({"llama-bpe", "llama3", "llama-v3", "smaug-bpe", "falcon3"})

# llama.cpp token types (tokenizer.ggml.token_type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4


class Tokenizer:
    """One model's tokenizer: encode, decode, chat prompt, end-of-generation ids."""

    def __init__(
        self,
        backend: "Backend | TiktokenCodec",
        *,
        bos_token_id: int | None,
        eos_token_ids: Iterable[int],
        add_bos: bool,
        chat_template: str | None,
    ) -> None:
        self._backend = backend
        self.bos_token_id = bos_token_id
        self.add_bos = add_bos and bos_token_id is not None
        self.bos_token = backend.id_to_token(bos_token_id) if bos_token_id is not None else None
        declared = [i for i in eos_token_ids if backend.id_to_token(i) is not None]
        self.eos_token = backend.id_to_token(declared[0]) if declared else None
        self.eos_token_ids = frozenset(declared) | _end_of_generation_ids(backend)
        self.has_chat_template = chat_template is not None
        self.chat_template = chat_template if chat_template is not None else FALLBACK_CHAT_TEMPLATE
        self._template: jinja2.Template | None = None
        self._special: dict[str, int] | None = None

    @property
    def backend(self) -> Backend:
        """The wrapped `tokenizers.Tokenizer` (a tiktoken vocabulary has none)."""
        assert isinstance(self._backend, Backend), "a tiktoken vocabulary has no tokenizers backend"
        return self._backend

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of text; special tokens written in it become their single ids."""
        # encode_batch_fast lets go of the GIL (encode does not), so a long prompt tokenized on
        # a worker thread leaves the event loop free; and it skips the offsets, whose freeing
        # alone held the GIL for 150 ms after a 3.9 MB prompt
        ids = self._backend.encode_batch_fast([text], add_special_tokens=False)[0].ids
        if add_special_tokens and self.add_bos:
            assert self.bos_token_id is not None
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of ids; special tokens left out unless asked for."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """Text of one token decoded on its own, special tokens included."""
        return self._backend.decode([token_id], skip_special_tokens=False)

    def render_chat(
        self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        """The prompt the chat template makes of messages; a template error is a BadRequest."""
        try:
            if self._template is None:
                self._template = _chat_environment().from_string(self.chat_template)
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **extra,
            )
        except (jinja2.TemplateError, TypeError) as e:
            raise BadRequest(f"chat template failed: {e}", param="messages") from e

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Token ids of the chat prompt, with BOS first when the model wants one and lacks it;
        tools (OpenAI's `tools` entries) go to the template only when given."""
        extra = {} if tools is None else {"tools": tools}
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, **extra)
        ids = self.encode(text)
        if self.add_bos and ids[:1] != [self.bos_token_id]:
            assert self.bos_token_id is not None
            ids = [self.bos_token_id, *ids]
        return ids

    @property
    def renders_tools(self) -> bool:
        """Whether the chat template itself lays out `tools` (else api/tools.py writes them)."""
        return self.has_chat_template and "tools" in self.chat_template

    def special_token_id(self, text: str) -> int | None:
        """The id of text when the vocabulary holds it as one special (added) token."""
        if self._special is None:
            added = self._backend.get_added_tokens_decoder().items()
            self._special = {t.content: i for i, t in added if t.special}
        return self._special.get(text)

    def tokenizers_json(self) -> str:
        """The vocabulary as `tokenizers` JSON (what llguidance reads); tiktoken's has none."""
        if not isinstance(self._backend, Backend):
            raise BadRequest("constrained decoding needs a tokenizers vocabulary, not tiktoken's")
        return self._backend.to_str()

    def stream(self, *, skip_special_tokens: bool = True) -> "StreamDecoder":
        """A decoder for token ids arriving one at a time."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    @classmethod
    def from_gguf(cls, fields: Mapping[str, Any]) -> "Tokenizer":
        """Build from a GGUF file's metadata (key → value, arrays as lists)."""
        kind = fields.get("tokenizer.ggml.model")
        if kind == "gpt2":
            backend = _byte_level_bpe(fields)
        elif kind == "llama":
            backend = _sentencepiece_bpe(fields)
        else:
            raise UnsupportedModel(f"GGUF tokenizer model {kind!r}: only 'gpt2' and 'llama' work")
        _add_gguf_special_tokens(backend, fields)
        eos = [
            fields[key]
            for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
            if key in fields
        ]
        return cls(
            backend,
            bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=eos,
            # llama.cpp's default: SentencePiece vocabularies want BOS unless they say otherwise
            add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", kind == "llama")),
            chat_template=fields.get("tokenizer.chat_template"),
        )

    @classmethod
    def from_hf_dir(cls, path: Path) -> "Tokenizer":
        """Build from a Hugging Face directory: tokenizer.json (or tiktoken.model),
        tokenizer_config.json, ..."""
        config = _read_json(path / "tokenizer_config.json")
        backend: Backend | TiktokenCodec
        if (path / "tokenizer.json").is_file():
            backend = Backend.from_file(str(path / "tokenizer.json"))
        elif (path / "tiktoken.model").is_file():  # Kimi K2: tiktoken, imported only for it
            from shoal.models import tiktoken_codec

            backend = tiktoken_codec.TiktokenCodec.from_dir(path, config)
        else:
            raise UnsupportedModel(
                f"{path}: no tokenizer.json or tiktoken.model (only fast tokenizers are read)"
            )
        bos_id = _token_id(backend, config.get("bos_token"))
        eos = [_token_id(backend, config.get("eos_token"))]
        for name in ("generation_config.json", "config.json"):
            declared = _read_json(path / name).get("eos_token_id")
            eos += declared if isinstance(declared, list) else [declared]
        add_bos = config.get("add_bos_token")
        if add_bos is None:  # the backend's post-processor decides; see whether it adds BOS
            first = backend.encode_batch_fast(["a"], add_special_tokens=True)[0].ids[:1]
            add_bos = bos_id is not None and first == [bos_id]
        return cls(
            backend,
            bos_token_id=bos_id,
            eos_token_ids=[i for i in eos if isinstance(i, int)],
            add_bos=bool(add_bos),
            chat_template=_hf_chat_template(path, config),
        )


class StreamDecoder:
    """Token ids in, text out as soon as it is complete: never half a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        # Decoding a short window and diffing keeps decoders that merge or strip across tokens
        # (SentencePiece's leading space, byte fallback) right. `_ids[:_read]` is already out.
        self._ids: list[int] = []
        self._read = 0

    def push(self, token_id: int) -> str:
        """Add one token; the text it completes, or "" while a character is still partial."""
        self._ids.append(token_id)
        done, text = self._texts()
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        del self._ids[: self._read]  # what was read becomes the next window's context
        self._read = len(self._ids)
        return text[len(done) :]

    def flush(self) -> str:
        """Whatever is left, even if incomplete; the decoder starts over afterwards."""
        done, text = self._texts()
        self._ids, self._read = [], 0
        return text[len(done) :]

    def _texts(self) -> tuple[str, str]:
        decode = self._tokenizer.decode
        done = decode(self._ids[: self._read], skip_special_tokens=self._skip)
        return done, decode(self._ids, skip_special_tokens=self._skip)


def _byte_level_bpe(fields: Mapping[str, Any]) -> Backend:
    """GPT-2 style byte-level BPE from a GGUF vocabulary and merges."""
    tokens: list[str] = fields["tokenizer.ggml.tokens"]
    pre = fields.get("tokenizer.ggml.pre", "default")
    splits = PRE_TOKENIZER_SPLITS.get(pre)
    if splits is None:
        log.warning("unknown tokenizer.ggml.pre %r: splitting text the GPT-2 way", pre)
        splits = PRE_TOKENIZER_SPLITS["default"]
    merges = [tuple(m.split(" ")) for m in fields.get("tokenizer.ggml.merges", [])]
    model = models.BPE(
        vocab=_vocab(tokens),
        merges=[(m[0], m[1]) for m in merges if len(m) == 2],
        ignore_merges=pre in _IGNORE_MERGES,
    )
    backend = Backend(model)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(fields: Mapping[str, Any]) -> Backend:
    """SentencePiece BPE (▁ for spaces, <0xNN> byte fallback) from a GGUF vocabulary and scores."""
    tokens: list[str] = fields["tokenizer.ggml.tokens"]
    types: list[int] = fields.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    vocab = _vocab(tokens)
    if "tokenizer.ggml.merges" in fields:
        merges = [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"]]
        pairs = [(m[0], m[1]) for m in merges if len(m) == 2]
    else:
        scores: list[float] = fields.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        pairs = _merges_from_scores(tokens, scores, types, vocab)
    unk_id = fields.get("tokenizer.ggml.unknown_token_id", 0)
    model = models.BPE(
        vocab=vocab, merges=pairs, unk_token=tokens[unk_id], byte_fallback=True, fuse_unk=True
    )
    backend = Backend(model)
    # Like llama.cpp (and SentencePiece), every run of text between special tokens gets the space
    # prefix, even one that starts with a space already.
    prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
    spaces = normalizers.Replace(" ", "▁")
    backend.normalizer = (
        normalizers.Sequence([normalizers.Prepend("▁"), spaces]) if prefix else spaces
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return backend


def _merges_from_scores(
    tokens: list[str], scores: list[float], types: list[int], vocab: dict[str, int]
) -> list[tuple[str, str]]:
    """BPE merges a SentencePiece vocabulary implies: best-scored merged piece first."""
    ranked: list[tuple[float, int, int, str, str]] = []
    for token, score, kind in zip(tokens, scores, types, strict=False):
        if kind not in (_NORMAL, _USER_DEFINED):
            continue
        for k in range(1, len(token)):
            left, right = token[:k], token[k:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _add_gguf_special_tokens(backend: Backend, fields: Mapping[str, Any]) -> None:
    """Control and unknown tokens become special tokens, user-defined ones plain added tokens."""
    tokens: list[str] = fields["tokenizer.ggml.tokens"]
    types: list[int] = fields.get("tokenizer.ggml.token_type") or []
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, k in zip(tokens, types, strict=False)
        if k in (_CONTROL, _UNKNOWN)
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, k in zip(tokens, types, strict=False)
        if k == _USER_DEFINED
    ]
    backend.add_special_tokens(special)
    backend.add_tokens(user)


def _end_of_generation_ids(backend: "Backend | TiktokenCodec") -> frozenset[int]:
    """Ids of the end-of-turn tokens the vocabulary holds as added (special) tokens."""
    added = {t.content: i for i, t in backend.get_added_tokens_decoder().items()}
    return frozenset(added[text] for text in END_OF_GENERATION if text in added)


def _vocab(tokens: list[str]) -> dict[str, int]:
    """Token → id; a text listed twice keeps its first id."""
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    return vocab


def _chat_environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    """A sandbox with the globals and filters Hugging Face chat templates expect."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """JSON as chat templates expect it: unicode kept, no HTML escaping."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    """What a template calls to reject its input."""
    raise jinja2.TemplateError(message)


def _hf_chat_template(path: Path, config: Mapping[str, Any]) -> str | None:
    """The chat template of a Hugging Face directory, wherever this version of it keeps it."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    template = config.get("chat_template") or _read_json(path / "chat_template.json").get(
        "chat_template"
    )
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _token_id(backend: "Backend | TiktokenCodec", token: str | dict[str, Any] | None) -> int | None:
    """Id of a token given as text or as tokenizer_config's {"content": ...}."""
    if isinstance(token, dict):
        token = token.get("content")
    return backend.token_to_id(token) if isinstance(token, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file, or {} when there is none."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}
