"""A tiktoken vocabulary (Kimi K2's `tiktoken.model`) behind the calls `Tokenizer` makes.

Kimi K2 (Instruct, Thinking) ships no tokenizer.json: `tiktoken.model` holds one
`<base64 token bytes> <rank>` line per byte-level BPE token, `tokenizer_config.json` names the
special tokens in `added_tokens_decoder`, and `tokenization_kimi.py` builds a tiktoken `Encoding`
from them with its own pre-tokenizer regex (`KIMI_PATTERN`) and 256 reserved special ids after
the ranks (those the config does not name are `<|reserved_token_{id}|>`). `TiktokenCodec` builds
the same Encoding and answers the subset of `tokenizers.Tokenizer` that models/tokenizer.py uses.
"""

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tiktoken
from tokenizers import AddedToken

from shoal.errors import UnsupportedModel

VOCAB_FILE = "tiktoken.model"
RESERVED_SPECIAL = 256  # special ids after the ranks, as tokenization_kimi.py reserves them
# tokenization_kimi.py's pat_str: Han runs; words with their case and contractions; 1-3 digits;
# punctuation runs; newlines; spaces
KIMI_PATTERN = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"""
        r"""[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"""
        r"""[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)


@dataclass(frozen=True)
class Encoded:
    """What `tokenizers` returns from encoding, as far as Tokenizer reads it."""

    ids: list[int]


def read_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken.model file: token bytes → rank."""
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:
            raise UnsupportedModel(f"{path}:{number}: not a tiktoken rank line ({e})") from None
    return ranks


def special_tokens(n_base: int, config: Mapping[str, Any]) -> dict[str, int]:
    """The reserved special ids after the ranks, named by tokenizer_config's
    added_tokens_decoder where it names them."""
    named = {
        int(i): entry["content"] for i, entry in (config.get("added_tokens_decoder") or {}).items()
    }
    ids = range(n_base, n_base + RESERVED_SPECIAL)
    return {named.get(i, f"<|reserved_token_{i}|>"): i for i in ids}


class TiktokenCodec:
    """A tiktoken Encoding with special tokens, called as Tokenizer calls `tokenizers`."""

    def __init__(self, name: str, ranks: dict[bytes, int], specials: dict[str, int]) -> None:
        self.encoding = tiktoken.Encoding(
            name, pat_str=KIMI_PATTERN, mergeable_ranks=ranks, special_tokens=specials
        )
        self._specials = specials
        self._special_ids = frozenset(specials.values())
        self._names = {i: t for t, i in specials.items()}

    @classmethod
    def from_dir(cls, path: Path, config: Mapping[str, Any]) -> "TiktokenCodec":
        """The codec of a directory holding tiktoken.model and its tokenizer_config."""
        ranks = read_ranks(path / VOCAB_FILE)
        return cls(path.name, ranks, special_tokens(len(ranks), config))

    def encode_batch_fast(
        self, texts: Sequence[str], add_special_tokens: bool = False
    ) -> list[Encoded]:
        """Each text's ids; special tokens written in it become their single ids."""
        return [Encoded(self.encoding.encode(t, allowed_special="all")) for t in texts]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ids (an incomplete UTF-8 character as U+FFFD); special tokens left out if
        asked."""
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return self.encoding.decode(list(ids))

    def id_to_token(self, token_id: int) -> str | None:
        """A special token's name, an ordinary token's text, or None for an unknown id."""
        if token_id in self._names:
            return self._names[token_id]
        if not 0 <= token_id < self.encoding.n_vocab:
            return None
        try:
            return self.encoding.decode_single_token_bytes(token_id).decode("utf-8", "replace")
        except KeyError:  # a gap in the ranks
            return None

    def token_to_id(self, token: str) -> int | None:
        """The id of a special token's name or of an ordinary token's text, else None."""
        if token in self._specials:
            return self._specials[token]
        try:
            return self.encoding.encode_single_token(token.encode())
        except KeyError:
            return None

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        """Ids in all: ranks and special tokens (the ranks only if not with_added_tokens)."""
        n = self.encoding.n_vocab
        return n if with_added_tokens else n - len(self._specials)

    def get_added_tokens_decoder(self) -> dict[int, AddedToken]:
        """The special tokens by id, as tokenizers lists its added ones."""
        return {i: AddedToken(t, special=True) for t, i in self._specials.items()}
