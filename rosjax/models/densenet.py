"""DenseNet, layer for layer torchvision's `torchvision.models.densenet`.

`DenseNet` takes torchvision's configuration arguments; its defaults are DenseNet-121: growth
rate 32, bottleneck width 4 x 32, 64 stem channels, blocks of (6, 12, 24, 16) layers,
transitions that halve the channels and average-pool 2x2, a final BatchNorm + ReLU, global
pool, `classifier`.
The initialisation is torchvision's: convolutions `kaiming_normal_` with its default fan_in
mode (DenseNet differs from ResNet here), BatchNorm 1/0, classifier weight with torch's
default Linear init and zero bias. Dropout inside dense layers is torchvision's default 0.

Submodules carry torchvision's module paths with '_' for '.': `features_conv0`,
`features_denseblock1/denselayer1/norm1`, `features_transition1/conv`, `classifier`.
"""
import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from rosjax.models import common

_conv = functools.partial(common.conv, kernel_init=common.KAIMING_NORMAL_FAN_IN)


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (bn_size x growth_rate) then BN-ReLU-3x3 conv: growth_rate new channels."""
    growth_rate: int
    bn_size: int
    dtype: Any

    @nn.compact
    def __call__(self, x, train: bool):  # x: [B, H, W, C] (all earlier features)
        bn = functools.partial(common.batch_norm, train=train, dtype=self.dtype)
        y = nn.relu(bn(name="norm1")(x))
        y = _conv(self.bn_size * self.growth_rate, 1, dtype=self.dtype, name="conv1")(y)
        y = nn.relu(bn(name="norm2")(y))
        y = _conv(self.growth_rate, 3, padding=1, dtype=self.dtype, name="conv2")(y)
        return y  # [B, H, W, growth_rate]


class DenseBlock(nn.Module):
    """`num_layers` dense layers, each fed the concatenation [input, new_1, ..., new_i-1]."""
    num_layers: int
    growth_rate: int
    bn_size: int
    dtype: Any

    @nn.compact
    def __call__(self, x, train: bool):  # x: [B, H, W, C]
        for index in range(self.num_layers):
            new = DenseLayer(self.growth_rate, self.bn_size, self.dtype,
                             name=f"denselayer{index + 1}")(x, train)
            x = jnp.concatenate([x, new], axis=-1)  # torchvision's channel order
        return x  # [B, H, W, C + growth_rate * num_layers]


class Transition(nn.Module):
    """BN-ReLU-1x1 conv to `out_features`, then 2x2 average pool with stride 2."""
    out_features: int
    dtype: Any

    @nn.compact
    def __call__(self, x, train: bool):  # x: [B, H, W, C]
        x = nn.relu(common.batch_norm(train=train, dtype=self.dtype, name="norm")(x))
        x = _conv(self.out_features, 1, dtype=self.dtype, name="conv")(x)
        return nn.avg_pool(x, (2, 2), strides=(2, 2))  # [B, H/2, W/2, out_features]


class DenseNet(nn.Module):
    """torchvision DenseNet (defaults: DenseNet-121).

    Call: `(x [B, H, W, C] in [0, 1], *, train, return_features)` -> logits [B, num_classes]
    (float32), or (logits, pooled features [B, D]); D = 1024 for DenseNet-121. `width` scales
    `growth_rate` and `num_init_features` (rounded to multiples of 8; 1.0: torchvision's).
    """
    num_classes: int
    dtype: Any = jnp.float32
    pixel_mean: tuple[float, ...] | None = None
    pixel_std: tuple[float, ...] | None = None
    growth_rate: int = 32
    block_config: tuple[int, ...] = (6, 12, 24, 16)
    num_init_features: int = 64
    bn_size: int = 4
    width: float = 1.0

    # torchvision names of the first convolution and of the classifier, for the weight loader.
    torch_stem: ClassVar[str] = "features.conv0"
    torch_head: ClassVar[str] = "classifier"

    @nn.compact
    def __call__(self, x, *, train: bool = False, return_features: bool = False):
        bn = functools.partial(common.batch_norm, train=train, dtype=self.dtype)
        x = common.normalize_pixels(x, self.pixel_mean, self.pixel_std, self.dtype)
        growth_rate = common.scaled_channels(self.growth_rate, self.width)
        x = _conv(common.scaled_channels(self.num_init_features, self.width), 7, stride=2, padding=3,
                  dtype=self.dtype,
                  name="features_conv0")(x)
        x = nn.relu(bn(name="features_norm0")(x))
        x = common.max_pool_3x3_s2(x)  # [B, H/4, W/4, num_init_features * width]
        for index, num_layers in enumerate(self.block_config):
            x = DenseBlock(num_layers, growth_rate, self.bn_size, self.dtype,
                           name=f"features_denseblock{index + 1}")(x, train)
            if index != len(self.block_config) - 1:
                x = Transition(x.shape[-1] // 2, self.dtype,
                               name=f"features_transition{index + 1}")(x, train)
        x = nn.relu(bn(name="features_norm5")(x))  # [B, H/32, W/32, D]
        features = common.global_avg_pool(x)  # [B, D]
        logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                          kernel_init=common.TORCH_LINEAR_KERNEL,
                          bias_init=nn.initializers.zeros, name="classifier")(features)
        return common.head_outputs(logits, features, return_features)
