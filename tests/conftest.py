"""Test set-up: eight simulated CPU devices, float32 matmuls at full precision.

XLA_FLAGS must be set before jax is first imported, which is why this lives here.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def no_torch(tmp_path_factory) -> str:
    """A directory to put first on a subprocess's PYTHONPATH so that `import torch` fails: torch is a
    test-only reference, and tensorboardX would otherwise import it (~2 s per process)."""
    path = tmp_path_factory.mktemp("no_torch")
    (path / "torch.py").write_text("raise ImportError('torch is not part of the training stack')\n")
    return str(path)
