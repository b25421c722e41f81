"""`tiny_cnn`: a two-convolution BatchNorm network for fast tests of the rest of rosjax.

Not one of the paper's models. It has everything the engine has to handle (parameters,
BatchNorm statistics, the pixel normalisation, `return_features`) and compiles in a moment.
Names follow the ResNet convention (`conv1`, `bn1`, ..., `fc`), so the torchvision-layout
weight loader works on it too.
"""
import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from rosjax.models import common


class TinyCNN(nn.Module):
    """conv3x3/2 (8) - BN - ReLU - conv3x3/2 (16) - BN - ReLU - global pool - `fc`.

    Call: `(x [B, H, W, C] in [0, 1], *, train, return_features)` -> logits [B, num_classes]
    (float32), or (logits, pooled features [B, F]), F = 16 at width 1. `width` scales both
    convolutions as every network of the zoo (`common.scaled_channels`: never below 8).
    """
    num_classes: int
    dtype: Any = jnp.float32
    width: float = 1.0
    pixel_mean: tuple[float, ...] | None = None
    pixel_std: tuple[float, ...] | None = None

    # torchvision-style names of the first convolution and of the classifier.
    torch_stem: ClassVar[str] = "conv1"
    torch_head: ClassVar[str] = "fc"

    @nn.compact
    def __call__(self, x, *, train: bool = False, return_features: bool = False):
        conv = functools.partial(common.conv, dtype=self.dtype)
        bn = functools.partial(common.batch_norm, train=train, dtype=self.dtype)
        x = common.normalize_pixels(x, self.pixel_mean, self.pixel_std, self.dtype)
        x = nn.relu(bn(name="bn1")(conv(common.scaled_channels(8, self.width), 3, stride=2, padding=1,
                                        name="conv1")(x)))
        x = nn.relu(bn(name="bn2")(conv(common.scaled_channels(16, self.width), 3, stride=2, padding=1,
                                        name="conv2")(x)))
        features = common.global_avg_pool(x)  # [B, F]
        logits = common.torch_dense(self.num_classes, features.shape[-1], dtype=self.dtype,
                                    name="fc")(features)
        return common.head_outputs(logits, features, return_features)
