"""Grammars for constrained decoding, and the llguidance `Constraint` that enforces them.

A grammar is llguidance's JSON text (`LLMatcher.grammar_from_*`): made here from a JSON schema or
any JSON object, or from a Lark grammar (tool calls: api/tools.py builds one per model family).
`constraint_factory` checks it once against the model's vocabulary, so a bad schema is a 400
before the request is admitted, and returns the factory the scheduler makes each choice's
`GrammarConstraint` with. llguidance is imported here only, when a request asks for a grammar.
"""

import json
import weakref
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from shoal.errors import BadRequest

if TYPE_CHECKING:
    import llguidance

# JSON as models write it: no whitespace between tokens, so a random (or stubborn) model cannot
# pad an answer with blanks until max_tokens cuts it off
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False}


class GrammarTokenizer(Protocol):
    """What a grammar needs of a tokenizer: the `tokenizers` JSON and the end-of-turn ids."""

    @property
    def eos_token_ids(self) -> frozenset[int]: ...

    @property
    def vocab_size(self) -> int: ...

    def tokenizers_json(self) -> str:
        """The vocabulary as a `tokenizers` JSON string (tokenizer.json's content)."""
        ...


def closed(schema: Any) -> Any:
    """schema with every object that lists its `properties` and says nothing of others closed
    to them (`additionalProperties: false`), inside allOf excepted (closing its parts would
    refuse their union). What it allows is still valid against schema; a small model, left
    free to add keys, adds them until max_tokens cuts the JSON off."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {
        k: v if k in ("allOf", "const", "enum", "default", "examples") else _closed_values(k, v)
        for k, v in schema.items()
    }
    if "properties" in out and not {"additionalProperties", "patternProperties"} & out.keys():
        out["additionalProperties"] = False
    return out


def _closed_values(key: str, value: Any) -> Any:
    if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
        return {name: closed(sub) for name, sub in value.items()}
    return closed(value) if isinstance(value, dict | list) else value


def json_schema(schema: dict[str, Any]) -> str:
    """A grammar for JSON text valid against schema (its objects `closed`)."""
    import llguidance

    options: Any = JSON_OPTIONS  # llguidance types it as a TypedDict of the same keys
    return llguidance.LLMatcher.grammar_from_json_schema(closed(schema), overrides=options)


def json_object() -> str:
    """A grammar for any JSON object (OpenAI's json_object response format)."""
    return json_schema({"type": "object"})


def lark(text: str) -> str:
    """A grammar from llguidance's Lark dialect (`%json {...}` inlines a schema)."""
    import llguidance

    return llguidance.LLMatcher.grammar_from_lark(text)


def lark_json(schema: dict[str, Any]) -> str:
    """A schema inlined in a Lark rule, with the compile options `json_schema` uses."""
    return "%json " + json.dumps({**closed(schema), "x-guidance": JSON_OPTIONS})


class GrammarConstraint:
    """One choice's llguidance matcher: the `Constraint` protocol of inference/constraint.py."""

    def __init__(self, matcher: "llguidance.LLMatcher", vocab_size: int) -> None:
        self._matcher = matcher
        self._words = (vocab_size + 31) // 32

    def allowed(self) -> np.ndarray | None:
        """The bitmask of tokens that keep the output in the grammar (uint32 [ceil(vocab/32)])."""
        mask = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint32)
        if len(mask) < self._words:  # the model's head may be wider than its tokenizer
            mask = np.concatenate([mask, np.zeros(self._words - len(mask), np.uint32)])
        return mask[: self._words].copy()

    def advance(self, token: int) -> None:
        """Take the sampled token; one outside the mask puts the matcher in its error state."""
        self._matcher.consume_token(token)

    @property
    def finished(self) -> bool:
        """The grammar is complete (or broken): nothing more may be generated."""
        return bool(self._matcher.is_stopped())

    @property
    def error(self) -> str:
        """Why the matcher stopped accepting tokens, or "" when it did not."""
        return str(self._matcher.get_error())


# llguidance's view of a vocabulary takes ~0.25 s to build for 49k tokens: made once per
# tokenizer object and dropped with it (weak keys), so two nodes in one process share nothing
_VOCABULARIES: "weakref.WeakKeyDictionary[Any, llguidance.LLTokenizer]" = (
    weakref.WeakKeyDictionary()
)


def vocabulary(tokenizer: GrammarTokenizer, vocab_size: int) -> "llguidance.LLTokenizer":
    """llguidance's tokenizer for this model (vocab_size: the width of its logits)."""
    import llguidance

    cached = _VOCABULARIES.get(tokenizer)
    if cached is None or cached.vocab_size != vocab_size:
        cached = llguidance.LLTokenizer(
            tokenizer.tokenizers_json(),
            n_vocab=max(vocab_size, tokenizer.vocab_size),
            eos_token=sorted(tokenizer.eos_token_ids),
        )
        _VOCABULARIES[tokenizer] = cached
    return cached


def constraint_factory(
    tokenizer: GrammarTokenizer, grammar: str, *, vocab_size: int, param: str
) -> "GrammarFactory":
    """Check grammar against the vocabulary (a BadRequest naming param if it does not compile)
    and return what makes a fresh `GrammarConstraint` for each choice."""
    import llguidance

    if not callable(getattr(tokenizer, "tokenizers_json", None)):
        raise BadRequest("this model's tokenizer cannot drive constrained decoding", param=param)
    vocab = vocabulary(tokenizer, vocab_size)
    first = llguidance.LLMatcher(vocab, grammar, log_level=0)
    if first.is_error():
        raise BadRequest(f"cannot build a grammar: {first.get_error()}", param=param)
    return GrammarFactory(first, vocab_size)


class GrammarFactory:
    """A `ConstraintFactory`: each matcher a copy of a checked, untouched one (cheaper than
    compiling the grammar again)."""

    def __init__(self, template: "llguidance.LLMatcher", vocab_size: int) -> None:
        self._template = template
        self._vocab_size = vocab_size

    def __call__(self) -> GrammarConstraint:
        return GrammarConstraint(self._template.deep_copy(), self._vocab_size)
