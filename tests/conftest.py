"""Every test runs on the CPU with 8 fake devices; sub-meshes take the first 2 or 4."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The main job turns on a persistent compilation cache next to its run directory: not in tests.
os.environ.setdefault("JAX_ENABLE_COMPILATION_CACHE", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
