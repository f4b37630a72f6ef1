"""Node processes for tests: the same helpers `shoal bench` uses."""

from shoal.bench.nodes import CLUSTER_FLAGS, NodeProcess, free_port, start_cluster_node, start_node

__all__ = ["CLUSTER_FLAGS", "NodeProcess", "free_port", "start_cluster_node", "start_node"]
