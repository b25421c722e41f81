"""MobileNet-V2, layer for layer torchvision's `torchvision.models.mobilenet_v2`.

Inverted residual blocks (1x1 expand, 3x3 depthwise, 1x1 linear projection) with ReLU6, the
torchvision initialisation (convolutions kaiming-normal fan_out, BatchNorm 1/0, classifier
N(0, 0.01) with zero bias) and dropout 0.2 before the classifier, so training mode needs a
'dropout' rng: `module.apply(..., train=True, rngs={'dropout': key})`.

`width` is torchvision's `width_mult`: every block's channels times it, rounded to a multiple
of 8, and the last 1x1 convolution's 1280 too, but only for widths above 1.

Submodules carry torchvision's module paths with '_' for '.': `features_0_0` is the stem
convolution `features.0.0`, `features_2/conv_1_0` the depthwise convolution `features.2.conv.1.0`,
`classifier_1` the Linear layer `classifier.1`.
"""
import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from rosjax.models import common

# torchvision's inverted_residual_setting: expansion t, output channels c, repeats n, stride s.
INVERTED_RESIDUAL_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                              (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
_STEM_FEATURES = 32
_LAST_FEATURES = 1280


class InvertedResidual(nn.Module):
    """torchvision's `InvertedResidual`; its Sequential `conv` gives the submodule names."""
    out_features: int
    stride: int
    expand_ratio: int
    dtype: Any

    @nn.compact
    def __call__(self, x, train: bool):  # x: [B, H, W, C_in]
        conv = functools.partial(common.conv, dtype=self.dtype)
        bn = functools.partial(common.batch_norm, train=train, dtype=self.dtype)
        hidden = x.shape[-1] * self.expand_ratio
        y = x
        index = 0  # position in torchvision's `conv` Sequential
        if self.expand_ratio != 1:
            y = conv(hidden, 1, name="conv_0_0")(y)
            y = nn.relu6(bn(name="conv_0_1")(y))  # [B, H, W, hidden]
            index = 1
        y = conv(hidden, 3, stride=self.stride, padding=1, groups=hidden,
                 name=f"conv_{index}_0")(y)
        y = nn.relu6(bn(name=f"conv_{index}_1")(y))  # [B, H/s, W/s, hidden]
        y = conv(self.out_features, 1, name=f"conv_{index + 1}")(y)
        y = bn(name=f"conv_{index + 2}")(y)  # [B, H/s, W/s, C_out]
        if self.stride == 1 and x.shape[-1] == self.out_features:
            return x + y
        return y


class MobileNetV2(nn.Module):
    """torchvision MobileNetV2 (`width` = width_mult); `inverted_residual_setting` as in torchvision.

    Call: `(x [B, H, W, C] in [0, 1], *, train, return_features)` -> logits [B, num_classes]
    (float32), or (logits, pooled features [B, 1280]) (more for width > 1).
    """
    num_classes: int
    dtype: Any = jnp.float32
    pixel_mean: tuple[float, ...] | None = None
    pixel_std: tuple[float, ...] | None = None
    dropout_rate: float = 0.2
    width: float = 1.0
    inverted_residual_setting: tuple[tuple[int, int, int, int], ...] = INVERTED_RESIDUAL_SETTING

    # torchvision names of the first convolution and of the classifier, for the weight loader.
    torch_stem: ClassVar[str] = "features.0.0"
    torch_head: ClassVar[str] = "classifier.1"

    @nn.compact
    def __call__(self, x, *, train: bool = False, return_features: bool = False):
        conv = functools.partial(common.conv, dtype=self.dtype)
        bn = functools.partial(common.batch_norm, train=train, dtype=self.dtype)
        x = common.normalize_pixels(x, self.pixel_mean, self.pixel_std, self.dtype)
        stem = common.scaled_channels(_STEM_FEATURES, self.width)
        x = conv(stem, 3, stride=2, padding=1, name="features_0_0")(x)
        x = nn.relu6(bn(name="features_0_1")(x))  # [B, H/2, W/2, 32 * width]
        index = 1
        for expand_ratio, out_features, repeats, first_stride in self.inverted_residual_setting:
            for repeat in range(repeats):
                stride = first_stride if repeat == 0 else 1
                block = InvertedResidual(common.scaled_channels(out_features, self.width), stride, expand_ratio,
                                         self.dtype, name=f"features_{index}")
                x = block(x, train)
                index += 1
        last = common.scaled_channels(_LAST_FEATURES, max(1.0, self.width))
        x = conv(last, 1, name=f"features_{index}_0")(x)
        x = nn.relu6(bn(name=f"features_{index}_1")(x))  # [B, H/32, W/32, last]
        features = common.global_avg_pool(x)  # [B, last]
        y = nn.Dropout(self.dropout_rate, deterministic=not train)(features)
        logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                          kernel_init=nn.initializers.normal(0.01),
                          bias_init=nn.initializers.zeros, name="classifier_1")(y)
        return common.head_outputs(logits, features, return_features)
