"""Test tiers: tests marked ``gpu`` need CUDA and are skipped, with the reason, where torch sees no GPU.

``pytest -m gpu`` selects them (``make gpu-check`` runs them on a GPU machine); ``pytest -m "not gpu"`` leaves
them out. Every other test runs on a CPU.
"""

import pytest


def _cuda_missing():
    """Why CUDA tests cannot run here, or None when they can."""
    import torch

    if torch.cuda.is_available():
        return None
    build = f"torch {torch.__version__}" + ("" if torch.version.cuda else " (a CPU-only build)")
    return (
        f"needs a CUDA GPU: {build} sees none (torch.cuda.is_available() is False); run `pytest -m gpu` "
        "or `make gpu-check` on a machine with a GPU"
    )


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    reason = _cuda_missing()
    if reason:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=reason))
