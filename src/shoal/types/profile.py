"""What a node is and can do: hardware, engines, measured speed, where to reach it."""

from typing import Literal

from pydantic import Field

from shoal.types.ids import NodeId
from shoal.types.message import Message


class GpuInfo(Message):
    """One accelerator; memory in bytes (unified memory on Apple Silicon).

    index: the device index a runner on this node opens it by (`cuda:{index}`): CUDA's, in PCI
    bus order, counting only the devices CUDA_VISIBLE_DEVICES leaves visible. The speed figures
    are measured once per GPU (profile/gpu_bench.py) and None until then."""

    vendor: Literal["nvidia", "apple", "amd", "other"]
    name: str
    memory_total: int = Field(ge=0)
    memory_free: int = Field(ge=0)
    backend: Literal["cuda", "metal", "rocm", "other"]
    index: int = Field(default=0, ge=0)
    memory_bandwidth_gbs: float | None = None
    matmul_gflops: float | None = None  # fp16

    @property
    def device(self) -> str:
        """The torch device name of this GPU ("cuda:1", "mps")."""
        return "mps" if self.backend == "metal" else f"cuda:{self.index}"


class Link(Message):
    """The control-plane round trip from a node to a peer, as it last measured it."""

    peer: NodeId
    rtt_ms: float = Field(ge=0)


class NodeProfile(Message):
    """A node's self-description, refreshed every few seconds."""

    node_id: NodeId
    hostname: str
    os: str  # "Linux", "Darwin", ...
    os_version: str
    arch: str  # "x86_64", "arm64", "ppc64le", ...
    cpu_model: str
    cpu_cores: int = Field(ge=1)  # logical
    ram_total: int = Field(ge=0)  # bytes
    ram_available: int = Field(ge=0)
    gpus: tuple[GpuInfo, ...] = ()
    engines: tuple[str, ...] = ()  # engines this node can run, best first
    memory_bandwidth_gbs: float | None = None  # measured once, cached on disk
    matmul_gflops: float | None = None  # measured once, cached on disk
    api_url: str = ""  # http://host:port of this node's API
    data_addr: str = ""  # host:port of its file server (model files for members, mutual TLS)
    version: str = ""
    links: tuple[Link, ...] = ()  # to each connected peer (profile/links.py), by peer id
