"""The model zoo: torchvision's classification networks as Flax linen modules.

`create(name, num_classes)` builds one of the paper's models (`MODEL_NAMES`), or one of the
small models for CPU runs (`SMALL_MODEL_NAMES`): `densenet21`, DenseNet-121's code with two
layers per dense block instead of 6/12/24/16 (21 layers counted as torchvision counts 121; the
smoke runs' DenseNet, compiled in a tenth of DenseNet-121's time), and `tiny_cnn`, a very small
BatchNorm CNN for fast tests. Neither is in the paper. Every model takes NHWC pixels in [0, 1] with any
channel count, normalises them with its `pixel_mean`/`pixel_std`, and returns float32 logits
[B, num_classes] (or `(logits, features)` with `return_features=True`):

    model = create("resnet18", num_classes=8, pixel_mean=(0.485, 0.456, 0.406),
                   pixel_std=(0.229, 0.224, 0.225))
    variables = model.init(jax.random.key(0), images, train=False)
    logits, new_state = model.apply(variables, images, train=True, mutable=["batch_stats"],
                                    rngs={"dropout": key})  # dropout: mobilenet_v2 only

Torchvision-layout weights (ImageNet checkpoints) load with
`rosjax.models.pretrained.load_torchvision_weights`.
"""
import functools
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from rosjax.models.densenet import DenseNet
from rosjax.models.mobilenet_v2 import MobileNetV2
from rosjax.models.resnet import BasicBlock, Bottleneck, ResNet
from rosjax.models.tiny import TinyCNN

MODEL_NAMES = ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "densenet121")
SMALL_MODEL_NAMES = ("densenet21", "tiny_cnn")
# The widest channel multiplier `create` builds (`width`; 1.0 is the paper's networks).
MAX_WIDTH = 4.0

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "resnet18": functools.partial(ResNet, block=BasicBlock, stage_sizes=(2, 2, 2, 2)),
    "resnet34": functools.partial(ResNet, block=BasicBlock, stage_sizes=(3, 4, 6, 3)),
    "resnet50": functools.partial(ResNet, block=Bottleneck, stage_sizes=(3, 4, 6, 3)),
    "mobilenet_v2": MobileNetV2,
    "densenet121": functools.partial(DenseNet, growth_rate=32, block_config=(6, 12, 24, 16),
                                     num_init_features=64, bn_size=4),
    "densenet21": functools.partial(DenseNet, growth_rate=32, block_config=(2, 2, 2, 2),
                                    num_init_features=64, bn_size=4),
    "tiny_cnn": TinyCNN,
}


# DenseNet's 7x7/2 stem, 3x3/2 max pool and three unpadded 2x2/2 average pools leave no pixel
# for its last dense block below 29 px, and its logits are NaN (the mean of an empty feature
# map). The other models pad every strided layer: any size the pipeline allows works.
_MIN_IMAGE_SIZE = {"densenet121": 29, "densenet21": 29}


def min_image_size(name: str) -> int:
    """The smallest square input, in pixels, on which model `name` computes finite logits."""
    return _MIN_IMAGE_SIZE.get(name, 1)


def create(name: str, num_classes: int, *, dtype: Any = jnp.float32,
           pixel_mean: Sequence[float] | None = None,
           pixel_std: Sequence[float] | None = None, width: float = 1.0) -> nn.Module:
    """Returns the Flax module `name` with a `num_classes`-way head.

    dtype: the compute dtype (e.g. jnp.bfloat16); parameters and BatchNorm statistics stay
      float32 and logits are returned as float32.
    pixel_mean, pixel_std: per-channel (or single) statistics applied as `(x - mean) / std`
      to the [0, 1] input; None leaves the input as it is.
    width: channel multiplier (torchvision's MobileNet `width_mult`, applied to every
      family; channel counts rounded to multiples of 8). 1.0 is the paper's networks, the
      only width ImageNet weights exist for; 0.25 trains a ResNet-50 step 18x faster on a CPU
      (a sixteenth of the weights). Any value in (0, MAX_WIDTH].
    """
    if name not in _REGISTRY:
        raise ValueError(f"Unknown model {name!r}; valid names: {', '.join(_REGISTRY)}.")
    if not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
    if pixel_std is not None and any(float(s) <= 0 for s in pixel_std):
        raise ValueError(f"pixel_std must be positive, got {tuple(pixel_std)}.")
    if not isinstance(width, numbers.Real) or not 0 < width <= MAX_WIDTH:
        raise ValueError(f"width must be a channel multiplier in (0, {MAX_WIDTH:g}], got {width!r}.")
    return _build(name, int(num_classes), dtype, float(width),
                  None if pixel_mean is None else tuple(float(m) for m in pixel_mean),
                  None if pixel_std is None else tuple(float(s) for s in pixel_std))


@functools.lru_cache(maxsize=64)
def _build(name: str, num_classes: int, dtype: Any, width: float, pixel_mean: tuple[float, ...] | None,
           pixel_std: tuple[float, ...] | None) -> nn.Module:
    """One module object per distinct arguments in a process.

    A train state holds `module.apply`, a bound method, which Python compares by the identity of
    its module; jit finds a compiled program by the state's static fields, so every run of one
    architecture (the student settings, the sweep points, each evaluation) reuses the programs
    of the first only if they hold the very same module. Linen modules are immutable
    descriptions (`init` and `apply` bind a copy), so sharing one is safe.
    """
    return _REGISTRY[name](num_classes=num_classes, dtype=dtype, width=width, pixel_mean=pixel_mean,
                           pixel_std=pixel_std)


__all__ = ["MAX_WIDTH", "MODEL_NAMES", "SMALL_MODEL_NAMES", "create", "min_image_size", "ResNet", "MobileNetV2",
           "DenseNet", "TinyCNN"]
