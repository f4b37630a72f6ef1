"""The one base of every frozen value that crosses a boundary: wire, pipe, state, cards, files.

`Message` is strict (a value must already have its field's type: no "3" for 3), which is what
messages between our own processes want. `Document` relaxes that for data people or other tools
write (TOML cards, a model's config.json, shards built from numbers of any int type): a list is
taken for a tuple, an int-like for an int. Both are frozen and refuse unknown fields.
"""

from pydantic import BaseModel, ConfigDict


class Message(BaseModel):
    """Frozen, strict, no extra fields: the base of messages and replicated values."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")


class Document(Message):
    """Frozen, no extra fields, lax types: for data read from files people write."""

    model_config = ConfigDict(strict=False)
