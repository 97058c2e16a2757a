"""Ray's fake multinode node provider, with nodes that unpack runtime envs into folders of their own, as real
nodes do on their own disks (tests/fake_cluster.yaml names it as an ``external`` provider).

Ray 2.60's fake nodes share the head's session directory, so all of them unpack a job's working_dir into the
same ``runtime_resources/working_dir_files/_ray_pkg_<hash>``, and the working_dir plugin unpacks with
``overwrite=True``: the first task of a job on a new node deletes and re-extracts the folder that the job's
driver on the head runs in. The driver's next ``os.getcwd()`` then fails with ``FileNotFoundError: [Errno 2] No
such file or directory`` and no file name (fsspec's local ``rm`` asks for it: score's plan failed there;
docs/cluster.md). Giving every fake node its own runtime-env folder removes the sharing that no real cluster has.

The monitor process of the head (``ray start --head --autoscaling-config=...``) imports this module: its folder
must be on that process's ``PYTHONPATH``.
"""

from __future__ import annotations

import functools
import uuid

import ray._private.parameter
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider


class SeparateDisksFakeProvider(FakeMultiNodeProvider):
    """:class:`FakeMultiNodeProvider` whose worker nodes each get their own runtime-env folder
    (``<session>/runtime_resources-<random>``); everything else is the fake provider's."""

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        with self.lock:  # an RLock (the parent takes it again): no other node is created meanwhile
            # the parent builds its RayParams inline; the one parameter it does not expose is added here
            ray_params = ray._private.parameter.RayParams
            ray._private.parameter.RayParams = functools.partial(
                ray_params, runtime_env_dir_name=f"runtime_resources-{uuid.uuid4().hex[:8]}")
            try:
                super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
            finally:
                ray._private.parameter.RayParams = ray_params
