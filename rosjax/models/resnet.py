"""ResNet-18/34/50, layer for layer torchvision's `torchvision.models.resnet`.

Same blocks, strides and paddings as torchvision (ResNet-50 is "v1.5": the stride sits on the
3x3 convolution of the bottleneck), the same initialisation (convolutions kaiming-normal with
fan_out, BatchNorm scale 1 / bias 0, the `fc` layer with torch's default Linear init, no
zero-initialised residual branches). `width` scales every channel count (64 * width in the
stem, 64 * width * 2^stage per stage; 1.0 is torchvision's, the only width ImageNet weights
exist for). Submodules are named after torchvision's modules with
'_' for '.', e.g. `layer1_0/downsample_0` holds `layer1.0.downsample.0.weight`, which is what
`rosjax.models.pretrained` relies on.
"""
import functools
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from rosjax.models import common


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""
    planes: int
    stride: int
    dtype: Any

    expansion: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x, train: bool):  # x: [B, H, W, C_in]
        conv = functools.partial(common.conv, dtype=self.dtype)
        bn = functools.partial(common.batch_norm, train=train, dtype=self.dtype)
        y = conv(self.planes, 3, stride=self.stride, padding=1, name="conv1")(x)
        y = nn.relu(bn(name="bn1")(y))
        y = conv(self.planes, 3, padding=1, name="conv2")(y)
        y = bn(name="bn2")(y)  # [B, H/s, W/s, planes]
        return nn.relu(y + _shortcut(x, self.planes * self.expansion, self.stride, conv, bn))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, with a residual connection (ResNet-50)."""
    planes: int
    stride: int
    dtype: Any

    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x, train: bool):  # x: [B, H, W, C_in]
        conv = functools.partial(common.conv, dtype=self.dtype)
        bn = functools.partial(common.batch_norm, train=train, dtype=self.dtype)
        y = nn.relu(bn(name="bn1")(conv(self.planes, 1, name="conv1")(x)))
        y = conv(self.planes, 3, stride=self.stride, padding=1, name="conv2")(y)
        y = nn.relu(bn(name="bn2")(y))
        out_features = self.planes * self.expansion
        y = bn(name="bn3")(conv(out_features, 1, name="conv3")(y))  # [B, H/s, W/s, 4 planes]
        return nn.relu(y + _shortcut(x, out_features, self.stride, conv, bn))


def _shortcut(x, out_features: int, stride: int, conv, bn):
    """Identity, or torchvision's `downsample` (1x1 strided conv + BN) when the shape changes."""
    if stride == 1 and x.shape[-1] == out_features:
        return x
    return bn(name="downsample_1")(conv(out_features, 1, stride=stride, name="downsample_0")(x))


class ResNet(nn.Module):
    """torchvision ResNet: 7x7/2 stem, 3x3/2 max pool, four stages, global pool, `fc`.

    Call: `(x [B, H, W, C] in [0, 1], *, train, return_features)` -> logits [B, num_classes]
    (float32), or (logits, pooled features [B, 8 * base * block.expansion]), base = 64 at width 1.
    """
    block: type
    stage_sizes: Sequence[int]
    num_classes: int
    dtype: Any = jnp.float32
    pixel_mean: tuple[float, ...] | None = None
    pixel_std: tuple[float, ...] | None = None
    width: float = 1.0

    # torchvision names of the first convolution and of the classifier, for the weight loader.
    torch_stem: ClassVar[str] = "conv1"
    torch_head: ClassVar[str] = "fc"

    @nn.compact
    def __call__(self, x, *, train: bool = False, return_features: bool = False):
        x = common.normalize_pixels(x, self.pixel_mean, self.pixel_std, self.dtype)
        base = common.scaled_channels(64, self.width)
        x = common.conv(base, 7, stride=2, padding=3, dtype=self.dtype, name="conv1")(x)
        x = nn.relu(common.batch_norm(train=train, dtype=self.dtype, name="bn1")(x))
        x = common.max_pool_3x3_s2(x)  # [B, H/4, W/4, base]
        for stage, num_blocks in enumerate(self.stage_sizes):
            planes = base * 2**stage
            for index in range(num_blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                x = self.block(planes, stride, self.dtype,
                               name=f"layer{stage + 1}_{index}")(x, train)
        features = common.global_avg_pool(x)  # [B, 512 * expansion]
        logits = common.torch_dense(self.num_classes, features.shape[-1], dtype=self.dtype,
                                    name="fc")(features)
        return common.head_outputs(logits, features, return_features)
