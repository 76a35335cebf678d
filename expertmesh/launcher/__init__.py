"""Launchers: a whole cluster from one config, as processes on this host (local.py) or across the hosts of a Ray
cluster (ray_cluster.py), both supervised by supervision.py's policy."""


class ClusterError(RuntimeError):
    """A node of the cluster failed to start or died."""
