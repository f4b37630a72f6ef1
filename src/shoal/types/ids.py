"""Distinct id types: a NodeId is not a RequestId, even though both are strings."""

from typing import NewType

NodeId = NewType("NodeId", str)
InstanceId = NewType("InstanceId", str)
RequestId = NewType("RequestId", str)
ModelId = NewType("ModelId", str)
