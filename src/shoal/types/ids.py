"""Distinct id types: a NodeId is not a RequestId, even though both are strings."""

import uuid
from typing import NewType

NodeId = NewType("NodeId", str)
InstanceId = NewType("InstanceId", str)
RequestId = NewType("RequestId", str)
ModelId = NewType("ModelId", str)


def new_instance_id(model_id: str) -> InstanceId:
    """A fresh id for an instance of the model: `<model id>-<8 hex digits>` (a repo id's `/`
    as `--`, so the id is one URL path segment)."""
    return InstanceId(f"{model_id.replace('/', '--')}-{uuid.uuid4().hex[:8]}")
