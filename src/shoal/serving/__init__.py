"""Serving: the API's requests onto the cluster's instances, and failing over when one breaks.

service.py   ClusterService: models' status, routing to the least-loaded ready instance,
             placing on request, the failover loop, pruning handles the state let go of
handles.py   InstanceHandle: RemotePipeline + Scheduler + its task, `recover` injected
failover.py  next_chain (pure): after a break, use an instance / place one / wait / give up
The master's placer (make_placer, why_not_runnable, profiles_of) lives in shoal.placer.
"""

from shoal.placer import make_placer, profiles_of, why_not_runnable
from shoal.serving.handles import InstanceHandle
from shoal.serving.service import ClusterService

__all__ = ["ClusterService", "InstanceHandle", "make_placer", "profiles_of", "why_not_runnable"]
