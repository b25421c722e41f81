"""experiments.benchmark_torch: its torch KD loss is rosjax's, and the --tiny run produces the
table (skipped where PyTorch is not installed: it is not a dependency of rosjax)."""
import importlib.util

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import benchmark_torch
from rosjax import losses

torch = pytest.importorskip("torch")


def test_torch_kd_loss_matches_rosjax():
    rng = np.random.default_rng(0)
    student = rng.normal(size=(6, 5)).astype(np.float32)  # [B, C]
    teachers = rng.normal(size=(3, 6, 5)).astype(np.float32) * 2  # [K, B, C]
    labels = rng.integers(0, 5, 6)
    weights = rng.exponential(size=3).astype(np.float32)
    expected, _ = losses.kd_loss(jnp.asarray(student), jnp.asarray(teachers), jnp.asarray(labels),
                                 jnp.asarray(weights), tau=0.5, alpha=0.9, multilabel=False)
    got = benchmark_torch.kd_loss(torch.from_numpy(student), torch.from_numpy(teachers),
                                  torch.from_numpy(labels), torch.from_numpy(weights), 0.5, 0.9)
    assert float(got) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="no torchvision")
def test_tiny_side_by_side(tmp_path, capsys):
    report = benchmark_torch.main(["--tiny", "--no-distill", "--out", str(tmp_path / "t.json")])
    (result,) = report["results"]
    assert "error" not in result, result
    assert result["step"] == "resnet18" and result["rosjax_images_per_s"] > 0
    assert result["rosjax_over_torch"] == pytest.approx(
        result["rosjax_images_per_s"] / result["torch_images_per_s"])
    assert "resnet18" in capsys.readouterr().out
