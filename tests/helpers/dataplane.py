"""Data-plane credentials for tests: runners serve with one member's, clients use another's.

Every data-plane test runs over mutual TLS, as nodes do: a cluster of two members made once per
test process (in a temporary directory removed at exit), plus a stranger from another CA.
"""

import functools
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.net.credentials import Credentials
from shoal.types.ids import ModelId
from shoal.worker.supervisor import RunnerConfig
from tests.helpers.tiny import N_LAYERS
from tests.helpers.trust import members


@dataclass(frozen=True)
class DataPlaneTrust:
    """A runner's credentials (its data dir is RunnerConfig.credentials) and a client's."""

    runner: Credentials
    client: Credentials
    stranger: Credentials  # a node of another cluster: its own CA

    @property
    def runner_dir(self) -> str:
        return str(self.runner.paths.node_key.parent)

    @functools.cached_property
    def _client_ssl(self) -> ssl.SSLContext:
        return self.client.client_ssl_context()

    def client_ssl(self) -> ssl.SSLContext:
        """The client's context (one, reused: contexts hold no connection state)."""
        return self._client_ssl


@functools.cache
def trust() -> DataPlaneTrust:
    """The process's test cluster (made on first use)."""
    root = Path(_tmp().name)
    runner, client = members(root / "cluster", 2)
    return DataPlaneTrust(runner, client, Credentials.create(root / "other", "other"))


@functools.cache
def _tmp() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="shoal-tls-")


def tiny_runner(model_dir: Path | str, **fields: Any) -> RunnerConfig:
    """A whole-model runner of the tiny llama in model_dir on torch, one thread, with the test
    cluster's credentials; fields override any of it (start and end for a stage)."""
    defaults: dict[str, Any] = {
        "model_path": str(model_dir),
        "model_id": ModelId("tiny"),
        "start": 0,
        "end": N_LAYERS,
        "n_layers": N_LAYERS,
        "engine": "torch",
        "device": "cpu",
        "threads": 1,
        "credentials": trust().runner_dir,
    }
    return RunnerConfig(**(defaults | fields))
