"""Torchvision-layout weights in and out of the model zoo's Flax variables, without PyTorch.

Files are `.safetensors` (read with `safetensors.numpy`) or `.npz`, keyed by torchvision's
`state_dict()` names (`layer1.0.conv1.weight`, `bn1.running_mean`, `features.0.0.weight`,
`features.denseblock1.denselayer1.norm1.weight`, `fc.weight`, ...).

The mapping is systematic. Every Flax submodule is named after its torchvision module with '_'
in place of '.', so a Flax leaf `(collection, *module_path, leaf)` is the tensor
`'.'.join(module_path).replace('_', '.') + '.' + suffix`, with

    params/kernel      <-> weight          conv: HWIO <-> OIHW; linear: [in, out] <-> [out, in]
    params/scale       <-> weight          BatchNorm
    params/bias        <-> bias
    batch_stats/mean   <-> running_mean
    batch_stats/var    <-> running_var

Depthwise kernels follow the same transpose (torch [C, 1, kh, kw] <-> Flax [kh, kw, 1, C]).
`num_batches_tracked` is ignored on reading and written as 0 on saving. DenseNet files in the
old `norm.1`/`conv.1` naming of torchvision's download URLs are renamed as torchvision does.

Two adaptations are made, and logged, rather than failing:
- classifier head: when the file's head has a different number of classes, the head is left
  as initialised (fine-tuning an ImageNet checkpoint on 8 lesion classes);
- grayscale stem: when the model's first convolution takes 1 channel and the file's takes 3,
  the kernel is summed over its input channels (timm's `adapt_input_conv` convention), so a
  gray image x gives the response the RGB network gives to (x, x, x). With pixel
  normalisation, give the model one mean/std (e.g. the average of the ImageNet ones).
"""
import logging
import pathlib
import re
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import traverse_util

from rosjax import models

logger = logging.getLogger(__name__)

_TO_TORCH_SUFFIX = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
# Axis permutations between the layouts: conv HWIO <-> OIHW, linear [in, out] <-> [out, in].
_TORCH_FROM_FLAX_AXES = {4: (3, 2, 0, 1), 2: (1, 0)}
_FLAX_FROM_TORCH_AXES = {4: (2, 3, 1, 0), 2: (1, 0)}
# torchvision's DenseNet checkpoints spell `norm1` as `norm.1` (see torchvision's
# `densenet._load_state_dict`, which applies this same pattern).
_LEGACY_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
                                  r"((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def load_torchvision_weights(module_name_or_module: str | nn.Module, variables: Any,
                             path: str | pathlib.Path, *, strict: bool = True) -> dict:
    """Returns `variables` with every tensor taken from the torchvision-layout file `path`.

    `variables` is the model's `{'params', 'batch_stats'}` tree (arrays, or
    `jax.ShapeDtypeStruct`s from `jax.eval_shape`); only its structure, shapes and dtypes are
    read, except for leaves that are kept (a fresh head; missing tensors when not strict).
    strict: raise one ValueError naming every missing, unexpected and mis-shaped tensor;
      when False, those are logged and skipped (missing leaves keep their value).
    """
    stem, head = _stem_and_head(module_name_or_module)
    path = pathlib.Path(path)
    tensors = _read(path)
    flat = traverse_util.flatten_dict(variables)
    loaded, missing, mis_shaped, fresh_head = {}, [], [], []
    for flax_key, leaf in flat.items():
        module_name, torch_key = _torch_names(flax_key)
        if torch_key not in tensors:
            missing.append(torch_key)
            loaded[flax_key] = leaf
            continue
        value = _to_flax_layout(tensors[torch_key])
        if module_name == stem and value.ndim == 4 and leaf.shape[2] == 1 and value.shape[2] == 3:
            value = value.sum(axis=2, keepdims=True)  # [kh, kw, 3, O] -> [kh, kw, 1, O]
            logger.info("%s: summed the 3-channel stem kernel over its input channels for "
                        "the 1-channel model.", torch_key)
        if value.shape == tuple(leaf.shape):
            loaded[flax_key] = jnp.asarray(value, leaf.dtype)
        elif module_name == head and value.shape[:-1] == tuple(leaf.shape[:-1]):
            fresh_head.append(f"{torch_key} ({value.shape[-1]} classes in the file, "
                              f"{leaf.shape[-1]} in the model)")
            loaded[flax_key] = leaf
        else:
            mis_shaped.append(f"{torch_key}: file {tensors[torch_key].shape}, model expects "
                              f"{_torch_shape(tuple(leaf.shape))}")
            loaded[flax_key] = leaf
    expected = {_torch_names(flax_key)[1] for flax_key in flat}
    unexpected = sorted(set(tensors) - expected)
    problems = [f"{label} ({len(keys)}): {', '.join(keys)}"
                for label, keys in (("missing from the file", missing),
                                    ("unexpected in the file", unexpected),
                                    ("wrong shape", mis_shaped)) if keys]
    if problems:
        message = f"{path}: " + "; ".join(problems)
        if strict:
            raise ValueError(message)
        logger.warning("Skipped tensors: %s", message)
    if fresh_head:
        logger.warning("%s: classifier head left as initialised: %s", path,
                       "; ".join(fresh_head))
    return traverse_util.unflatten_dict(loaded)


def save_torchvision_weights(module_name_or_module: str | nn.Module, variables: Any,
                             path: str | pathlib.Path) -> None:
    """Writes `variables` as a torchvision `state_dict` to a `.safetensors` or `.npz` file.

    The inverse of `load_torchvision_weights` (plus a zero `num_batches_tracked` per
    BatchNorm, which torch's `load_state_dict(strict=True)` expects).
    """
    stem, head = _stem_and_head(module_name_or_module)
    path = pathlib.Path(path)
    tensors = {}
    for flax_key, leaf in traverse_util.flatten_dict(variables).items():
        module_name, torch_key = _torch_names(flax_key)
        tensors[torch_key] = np.ascontiguousarray(_to_torch_layout(np.asarray(leaf)))
        if flax_key[-1] == "mean" and flax_key[0] == "batch_stats":
            tensors[f"{module_name}.num_batches_tracked"] = np.zeros((), np.int64)
    for module_name in (stem, head):
        if f"{module_name}.weight" not in tensors:
            raise ValueError(f"variables have no {module_name!r} layer; they do not belong "
                             f"to {module_name_or_module!r}.")
    if path.suffix == ".safetensors":
        safetensors.numpy.save_file(tensors, str(path))
    elif path.suffix == ".npz":
        np.savez(path, **tensors)
    else:
        raise ValueError(f"{path}: unsupported suffix {path.suffix!r}; use .safetensors or .npz.")


def _stem_and_head(module_name_or_module: str | nn.Module) -> tuple[str, str]:
    """torchvision names of the model's first convolution and of its classifier."""
    module = (models.create(module_name_or_module, 1)
              if isinstance(module_name_or_module, str) else module_name_or_module)
    return module.torch_stem, module.torch_head


def _torch_names(flax_key: tuple[str, ...]) -> tuple[str, str]:
    """('params', 'layer1_0', 'conv1', 'kernel') -> ('layer1.0.conv1', 'layer1.0.conv1.weight')."""
    suffix = _TO_TORCH_SUFFIX.get((flax_key[0], flax_key[-1]))
    if suffix is None:
        raise ValueError(f"{'/'.join(flax_key)} has no torchvision counterpart; pass the "
                         "model's {'params', 'batch_stats'} variables only.")
    module_name = ".".join(flax_key[1:-1]).replace("_", ".")
    return module_name, f"{module_name}.{suffix}"


def _to_flax_layout(tensor: np.ndarray) -> np.ndarray:
    """conv OIHW -> HWIO, linear [out, in] -> [in, out]; vectors unchanged."""
    return tensor.transpose(_FLAX_FROM_TORCH_AXES.get(tensor.ndim, range(tensor.ndim)))


def _to_torch_layout(array: np.ndarray) -> np.ndarray:
    """conv HWIO -> OIHW, linear [in, out] -> [out, in]; vectors unchanged."""
    return array.transpose(_TORCH_FROM_FLAX_AXES.get(array.ndim, range(array.ndim)))


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torchvision shape of a tensor with Flax shape `flax_shape`."""
    axes = _TORCH_FROM_FLAX_AXES.get(len(flax_shape), range(len(flax_shape)))
    return tuple(flax_shape[axis] for axis in axes)


def _read(path: pathlib.Path) -> dict[str, np.ndarray]:
    """The file's tensors by torchvision name, without `num_batches_tracked`."""
    if path.suffix == ".safetensors":
        raw = safetensors.numpy.load_file(str(path))
    elif path.suffix == ".npz":
        with np.load(path) as archive:
            raw = {key: archive[key] for key in archive.files}
    else:
        raise ValueError(f"{path}: unsupported suffix {path.suffix!r}; use .safetensors or .npz.")
    return {_LEGACY_DENSENET_KEY.sub(r"\1\2", key): value for key, value in raw.items()
            if not key.endswith("num_batches_tracked")}
