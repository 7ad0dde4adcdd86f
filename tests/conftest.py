"""Every test runs on the CPU with 8 fake devices; sub-meshes take the first 2 or 4.

A test marked `@pytest.mark.needs(...)` skips, with the reason, where the machine lacks what it names
(tests/machine.py).
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from tests import machine  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(items):
    # A skip mark, not a skip in setup: the report then names the test's own line, and the machine is probed only
    # when a test that needs it was collected.
    for item in items:
        marker = item.get_closest_marker("needs")
        if marker is not None and (reason := machine.lacks(*marker.args)):
            item.add_marker(pytest.mark.skip(reason=reason))
