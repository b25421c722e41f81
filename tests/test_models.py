"""Tests for the model zoo (`rosjax.models`) and its torchvision weight loader.

The references are independent of the code under test: torchvision's published parameter
counts; torchvision `state_dict` layouts written out below from torchvision's model
definitions; NumPy forward passes in torch's NCHW layout that read those state dicts by
torchvision name. Full-size networks are only traced (`jax.eval_shape`, no compilation);
two are compiled (ResNet-18, MobileNet-V2 at 32 px, batch 2), the rest uses `tiny_cnn` and
small configurations of the same classes.

Keys are `rbg` keys: XLA:CPU compiles RngBitGenerator draws about ten times faster than the
default threefry ones, and initialisation is dominated by compiling the random draws.
"""
import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import traverse_util
from numpy.lib.stride_tricks import sliding_window_view

from rosjax import models
from rosjax.models import pretrained
from rosjax.models.densenet import DenseNet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EPS = 1e-5  # torch.nn.BatchNorm2d's default
FEATURE_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "mobilenet_v2": 1280,
                "densenet121": 1024}
STEM_CONV = {"resnet18": "conv1", "resnet34": "conv1", "resnet50": "conv1",
             "mobilenet_v2": "features_0_0", "densenet121": "features_conv0"}
# A small DenseNet with every part of DenseNet-121 (stem, 4 blocks, 3 transitions, norm5).
SMALL_DENSENET = dict(growth_rate=8, block_config=(2, 1, 1, 1), num_init_features=16,
                      bn_size=2)


def rng_key(seed):
    return jax.random.key(seed, impl="rbg")


def images(channels, seed=0):
    """Pixels in [0, 1], [2, 32, 32, channels]."""
    return np.random.default_rng(seed).uniform(0, 1, (2, 32, 32, channels)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# torchvision state_dict layouts, written from torchvision.models.{resnet,mobilenetv2,densenet}


class TorchLayout:
    """Shapes of a torchvision `state_dict`, added module by module."""

    def __init__(self):
        self.shapes = {}

    def conv(self, name, out_ch, in_ch, k):
        self.shapes[f"{name}.weight"] = (out_ch, in_ch, k, k)

    def bn(self, name, ch):
        for suffix in ("weight", "bias", "running_mean", "running_var"):
            self.shapes[f"{name}.{suffix}"] = (ch,)
        self.shapes[f"{name}.num_batches_tracked"] = ()

    def linear(self, name, out_f, in_f):
        self.shapes[f"{name}.weight"] = (out_f, in_f)
        self.shapes[f"{name}.bias"] = (out_f,)


def make_divisible(v, divisor=8):
    """torchvision's `_make_divisible` (torchvision.models._utils), as written there."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def resnet_layout(bottleneck, layers, num_classes, in_ch, base=64):
    """`base`: the stem's channels (64 in torchvision); stage i has base * 2^i planes."""
    t = TorchLayout()
    t.conv("conv1", base, in_ch, 7)
    t.bn("bn1", base)
    expansion = 4 if bottleneck else 1
    inplanes = base
    for i, blocks in enumerate(layers):
        planes = base * 2**i
        for j in range(blocks):
            p = f"layer{i + 1}.{j}"
            stride = 2 if i > 0 and j == 0 else 1
            if bottleneck:
                t.conv(f"{p}.conv1", planes, inplanes, 1)
                t.bn(f"{p}.bn1", planes)
                t.conv(f"{p}.conv2", planes, planes, 3)
                t.bn(f"{p}.bn2", planes)
                t.conv(f"{p}.conv3", planes * 4, planes, 1)
                t.bn(f"{p}.bn3", planes * 4)
            else:
                t.conv(f"{p}.conv1", planes, inplanes, 3)
                t.bn(f"{p}.bn1", planes)
                t.conv(f"{p}.conv2", planes, planes, 3)
                t.bn(f"{p}.bn2", planes)
            if j == 0 and (stride != 1 or inplanes != planes * expansion):
                t.conv(f"{p}.downsample.0", planes * expansion, inplanes, 1)
                t.bn(f"{p}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    t.linear("fc", num_classes, inplanes)
    return t.shapes


TORCHVISION_MOBILENET_V2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                            (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def mobilenet_v2_layout(num_classes, in_ch, width_mult=1.0):
    """torchvision's `MobileNetV2(width_mult=...)`: channels rounded by `make_divisible`."""
    t = TorchLayout()
    stem, last = make_divisible(32 * width_mult), make_divisible(1280 * max(1.0, width_mult))
    t.conv("features.0.0", stem, in_ch, 3)
    t.bn("features.0.1", stem)
    inp, idx = stem, 1
    for expand, out, repeats, _ in TORCHVISION_MOBILENET_V2:
        out = make_divisible(out * width_mult)
        for _ in range(repeats):
            hidden, p, j = inp * expand, f"features.{idx}.conv", 0
            if expand != 1:
                t.conv(f"{p}.0.0", hidden, inp, 1)
                t.bn(f"{p}.0.1", hidden)
                j = 1
            t.conv(f"{p}.{j}.0", hidden, 1, 3)  # depthwise: [C, 1, 3, 3]
            t.bn(f"{p}.{j}.1", hidden)
            t.conv(f"{p}.{j + 1}", out, hidden, 1)
            t.bn(f"{p}.{j + 2}", out)
            inp, idx = out, idx + 1
    t.conv(f"features.{idx}.0", last, inp, 1)
    t.bn(f"features.{idx}.1", last)
    t.linear("classifier.1", num_classes, last)
    return t.shapes


def densenet_layout(num_classes, in_ch, growth_rate=32, block_config=(6, 12, 24, 16),
                    num_init_features=64, bn_size=4):
    t = TorchLayout()
    t.conv("features.conv0", num_init_features, in_ch, 7)
    t.bn("features.norm0", num_init_features)
    nf = num_init_features
    for i, layers in enumerate(block_config):
        for j in range(layers):
            p = f"features.denseblock{i + 1}.denselayer{j + 1}"
            t.bn(f"{p}.norm1", nf + j * growth_rate)
            t.conv(f"{p}.conv1", bn_size * growth_rate, nf + j * growth_rate, 1)
            t.bn(f"{p}.norm2", bn_size * growth_rate)
            t.conv(f"{p}.conv2", growth_rate, bn_size * growth_rate, 3)
        nf += layers * growth_rate
        if i != len(block_config) - 1:
            t.bn(f"features.transition{i + 1}.norm", nf)
            t.conv(f"features.transition{i + 1}.conv", nf // 2, nf, 1)
            nf //= 2
    t.bn("features.norm5", nf)
    t.linear("classifier", num_classes, nf)
    return t.shapes


LAYOUTS = {
    "resnet18": functools.partial(resnet_layout, False, (2, 2, 2, 2)),
    "resnet34": functools.partial(resnet_layout, False, (3, 4, 6, 3)),
    "resnet50": functools.partial(resnet_layout, True, (3, 4, 6, 3)),
    "mobilenet_v2": mobilenet_v2_layout,
    "densenet121": densenet_layout,
}


def random_state_dict(shapes, seed):
    """Random tensors with O(1) activations: kaiming-scaled weights, BN stats near (0, 1)."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            out[key] = np.array(rng.integers(1, 1000), np.int64)
            continue
        if key.endswith("running_var") or (len(shape) == 1 and key.endswith("weight")):
            out[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:  # weights: kaiming scale; bias, running_mean: 0.1
            scale = math.sqrt(2.0 / math.prod(shape[1:])) if len(shape) >= 2 else 0.1
            out[key] = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
    return out


def is_parameter(key):
    return not key.endswith(("running_mean", "running_var", "num_batches_tracked"))


# ---------------------------------------------------------------------------------------------
# NumPy forward passes in NCHW from torchvision state dicts (eval-mode BatchNorm)


def np_conv(x, w, stride=1, padding=0, groups=1):
    """torch.nn.functional.conv2d: x [B, C, H, W], w [O, C / groups, kh, kw]."""
    x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    out_ch, _, kh, kw = w.shape
    win = sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]
    b, c, ho, wo = win.shape[:4]
    win = win.reshape(b, groups, c // groups, ho, wo, kh, kw)
    w = w.reshape(groups, out_ch // groups, -1, kh, kw)
    return np.einsum("bgchwij,gocij->bgohw", win, w, optimize=True).reshape(b, out_ch, ho, wo)


def np_bn(x, sd, name):
    scale = sd[f"{name}.weight"] / np.sqrt(sd[f"{name}.running_var"] + EPS)
    shift = sd[f"{name}.bias"] - sd[f"{name}.running_mean"] * scale
    return x * scale[:, None, None] + shift[:, None, None]


def np_max_pool_3x3_s2_p1(x):
    x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    return sliding_window_view(x, (3, 3), axis=(2, 3))[:, :, ::2, ::2].max(axis=(-2, -1))


def relu(x):
    return np.maximum(x, 0)


def np_head(x, sd, name):
    features = x.mean(axis=(2, 3))  # [B, D]
    return features @ sd[f"{name}.weight"].T + sd[f"{name}.bias"], features


def np_resnet18(sd, x):
    x = np_max_pool_3x3_s2_p1(relu(np_bn(np_conv(x, sd["conv1.weight"], 2, 3), sd, "bn1")))
    for i in range(4):
        for j in range(2):
            p, stride = f"layer{i + 1}.{j}", 2 if i > 0 and j == 0 else 1
            y = relu(np_bn(np_conv(x, sd[f"{p}.conv1.weight"], stride, 1), sd, f"{p}.bn1"))
            y = np_bn(np_conv(y, sd[f"{p}.conv2.weight"], 1, 1), sd, f"{p}.bn2")
            if f"{p}.downsample.0.weight" in sd:
                x = np_bn(np_conv(x, sd[f"{p}.downsample.0.weight"], stride), sd,
                          f"{p}.downsample.1")
            x = relu(y + x)
    return np_head(x, sd, "fc")


def np_mobilenet_v2(sd, x):
    relu6 = functools.partial(np.clip, a_min=0, a_max=6)
    x = relu6(np_bn(np_conv(x, sd["features.0.0.weight"], 2, 1), sd, "features.0.1"))
    idx = 1
    for expand, out, repeats, first_stride in TORCHVISION_MOBILENET_V2:
        for r in range(repeats):
            p, stride, j, y = f"features.{idx}.conv", first_stride if r == 0 else 1, 0, x
            if expand != 1:
                y = relu6(np_bn(np_conv(y, sd[f"{p}.0.0.weight"]), sd, f"{p}.0.1"))
                j = 1
            y = np_conv(y, sd[f"{p}.{j}.0.weight"], stride, 1, groups=y.shape[1])
            y = relu6(np_bn(y, sd, f"{p}.{j}.1"))
            y = np_bn(np_conv(y, sd[f"{p}.{j + 1}.weight"]), sd, f"{p}.{j + 2}")
            x = x + y if stride == 1 and x.shape[1] == out else y
            idx += 1
    x = relu6(np_bn(np_conv(x, sd[f"features.{idx}.0.weight"]), sd, f"features.{idx}.1"))
    return np_head(x, sd, "classifier.1")  # dropout is the identity in eval mode


def np_densenet(sd, x, block_config):
    x = relu(np_bn(np_conv(x, sd["features.conv0.weight"], 2, 3), sd, "features.norm0"))
    x = np_max_pool_3x3_s2_p1(x)
    for i, layers in enumerate(block_config):
        for j in range(layers):
            p = f"features.denseblock{i + 1}.denselayer{j + 1}"
            y = np_conv(relu(np_bn(x, sd, f"{p}.norm1")), sd[f"{p}.conv1.weight"])
            y = np_conv(relu(np_bn(y, sd, f"{p}.norm2")), sd[f"{p}.conv2.weight"], 1, 1)
            x = np.concatenate([x, y], axis=1)
        if i != len(block_config) - 1:
            p = f"features.transition{i + 1}"
            x = np_conv(relu(np_bn(x, sd, f"{p}.norm")), sd[f"{p}.conv.weight"])
            b, c, h, w = x.shape
            x = x[:, :, :h // 2 * 2, :w // 2 * 2].reshape(b, c, h // 2, 2, w // 2, 2).mean((3, 5))
    return np_head(relu(np_bn(x, sd, "features.norm5")), sd, "classifier")


def np_normalize_nchw(x_nhwc, mean, std):
    return ((x_nhwc.astype(np.float64) - np.asarray(mean)) / np.asarray(std)).transpose(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------
# Shared, cached set-ups


@functools.cache
def abstract(name, channels, num_classes):
    """(variables, (logits, features)) as ShapeDtypeStructs, traced only."""
    model = models.create(name, num_classes)
    init = functools.partial(model.init_with_output, return_features=True)
    return jax.eval_shape(init, rng_key(0), jax.ShapeDtypeStruct((2, 32, 32, channels),
                                                                 jnp.float32))[::-1]


def write_safetensors(tmp_path, sd, name="weights.safetensors"):
    path = tmp_path / name
    safetensors.numpy.save_file(sd, str(path))
    return path


def leaf(tree, *path):
    return np.asarray(traverse_util.flatten_dict(tree)[path])


@pytest.fixture(scope="module")
def resnet18_case(tmp_path_factory):
    """Random torchvision ResNet-18 weights loaded into Flax, its float32 outputs, and input."""
    sd = random_state_dict(LAYOUTS["resnet18"](1000, 3), seed=1)
    path = write_safetensors(tmp_path_factory.mktemp("resnet18"), sd)
    variables = pretrained.load_torchvision_weights("resnet18", abstract("resnet18", 3, 1000)[0],
                                                    path)
    x = images(3)
    model = models.create("resnet18", 1000, pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD)
    logits, features = jax.jit(functools.partial(model.apply, return_features=True))(
        variables, x)
    return dict(sd=sd, variables=variables, x=x, logits=np.asarray(logits),
                features=np.asarray(features))


def assert_close(actual, expected, rtol):
    """Max abs error within rtol of the reference's largest magnitude."""
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * np.abs(expected).max())


# ---------------------------------------------------------------------------------------------
# Registry, parameter counts, shapes


def test_model_names_and_unknown_name_lists_valid_names():
    assert models.MODEL_NAMES == ("resnet18", "resnet34", "resnet50", "mobilenet_v2",
                                  "densenet121")
    with pytest.raises(ValueError) as error:
        models.create("resnet101", 10)
    for name in models.MODEL_NAMES + ("tiny_cnn",):
        assert name in str(error.value)
    with pytest.raises(ValueError, match="num_classes"):
        models.create("resnet18", 0)
    with pytest.raises(ValueError, match="pixel_std"):
        models.create("resnet18", 2, pixel_std=(0.2, 0.0, 0.2))


@pytest.mark.parametrize("name, count", [("resnet18", 11_689_512), ("resnet34", 21_797_672),
                                         ("resnet50", 25_557_032), ("mobilenet_v2", 3_504_872),
                                         ("densenet121", 7_978_856)])
def test_parameter_counts_match_torchvision(name, count):
    variables, _ = abstract(name, 3, 1000)
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(variables["params"])) == count
    # The hand-written torchvision layouts used by the loader tests agree with torchvision too.
    layout = LAYOUTS[name](1000, 3)
    assert sum(math.prod(s) for k, s in layout.items() if is_parameter(k)) == count


def test_torchvision_channel_rounding_by_hand():
    # 0.25 x (32, 16, 24, 32, 64, 96, 160, 320): 8, 4, 6, 8, 16, 24, 40, 80; 4 and 6 round up to 8.
    assert [make_divisible(c * 0.25) for c in (32, 16, 24, 32, 64, 96, 160, 320)] == [8, 8, 8, 8, 16, 24, 40, 80]
    assert make_divisible(1280 * 1.4) == 1792 and make_divisible(32 * 1.4) == 48


# The width's references: torchvision's MobileNetV2(width_mult) for MobileNet-v2; for the other
# families (torchvision has no width multiplier for them), the torchvision layout with every
# channel count scaled: ResNet's stem base 64 * width, DenseNet's growth rate and stem.
@pytest.mark.parametrize("name, width, layout", [
    ("mobilenet_v2", 0.25, functools.partial(mobilenet_v2_layout, width_mult=0.25)),
    ("mobilenet_v2", 0.5, functools.partial(mobilenet_v2_layout, width_mult=0.5)),
    ("mobilenet_v2", 1.4, functools.partial(mobilenet_v2_layout, width_mult=1.4)),
    ("resnet18", 0.25, functools.partial(resnet_layout, False, (2, 2, 2, 2), base=16)),
    ("resnet50", 0.25, functools.partial(resnet_layout, True, (3, 4, 6, 3), base=16)),
    ("resnet34", 0.5, functools.partial(resnet_layout, False, (3, 4, 6, 3), base=32)),
    ("densenet21", 0.25, functools.partial(densenet_layout, growth_rate=8, block_config=(2, 2, 2, 2),
                                           num_init_features=16)),
])
def test_width_scales_every_channel_count_as_the_reference_layout(name, width, layout):
    model = models.create(name, 8, width=width)
    variables = jax.eval_shape(functools.partial(model.init, train=False), rng_key(0),
                               jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
    reference = layout(8, 3)
    kernels = sorted(math.prod(x.shape) for path, x in traverse_util.flatten_dict(variables["params"]).items()
                     if path[-1] == "kernel")
    # Every weight matrix / convolution kernel, as multisets of sizes, and the parameter total.
    assert kernels == sorted(math.prod(s) for k, s in reference.items() if k.endswith("weight") and len(s) > 1)
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(variables["params"])) == sum(
        math.prod(s) for k, s in reference.items() if is_parameter(k))


@pytest.mark.parametrize("width, channels", [(1.0, (8, 16)), (2.0, (16, 32)), (0.25, (8, 8))])
def test_tiny_cnn_scales_its_two_convolutions(width, channels):
    """The test network widens too: 8 and 16 channels times the width, never below 8."""
    variables = jax.eval_shape(functools.partial(models.create("tiny_cnn", 5, width=width).init, train=False),
                               rng_key(0), jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32))["params"]
    assert variables["conv1"]["kernel"].shape == (3, 3, 3, channels[0])
    assert variables["conv2"]["kernel"].shape == (3, 3, channels[0], channels[1])
    assert variables["fc"]["kernel"].shape == (channels[1], 5)


def test_width_must_be_a_positive_multiplier():
    for width in (0, -0.5, 5):
        with pytest.raises(ValueError, match="width"):
            models.create("resnet18", 2, width=width)


@pytest.mark.parametrize("name, channels, num_classes",
                         [(name, 3, 1000) for name in models.MODEL_NAMES]
                         + [("resnet18", 1, 7), ("mobilenet_v2", 1, 5)])
def test_output_shapes_for_gray_and_color_input(name, channels, num_classes):
    """(Gray input is also run through MobileNet-V2 and a DenseNet against NumPy below.)"""
    variables, (logits, features) = abstract(name, channels, num_classes)
    assert (logits.shape, logits.dtype) == ((2, num_classes), jnp.float32)
    assert (features.shape, features.dtype) == ((2, FEATURE_DIMS[name]), jnp.float32)
    stem = variables["params"][STEM_CONV[name]]["kernel"]
    assert stem.shape[2] == channels  # HWIO


def test_pixel_statistics_must_match_channels():
    model = models.create("tiny_cnn", 3, pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD)
    with pytest.raises(ValueError, match="pixel_mean has 3 values but the input has 1"):
        jax.eval_shape(model.init, rng_key(0), jnp.zeros((2, 32, 32, 1)))


# ---------------------------------------------------------------------------------------------
# Forward passes against NumPy references


def test_resnet18_matches_numpy_reference(resnet18_case):
    c = resnet18_case
    want_logits, want_features = np_resnet18(
        c["sd"], np_normalize_nchw(c["x"], IMAGENET_MEAN, IMAGENET_STD))
    assert_close(c["logits"], want_logits, 1e-4)
    assert_close(c["features"], want_features, 1e-4)


def test_mobilenet_v2_gray_matches_numpy_reference(tmp_path):
    sd = random_state_dict(LAYOUTS["mobilenet_v2"](5, 1), seed=2)
    variables = pretrained.load_torchvision_weights(
        "mobilenet_v2", abstract("mobilenet_v2", 1, 5)[0], write_safetensors(tmp_path, sd))
    x = images(1)
    model = models.create("mobilenet_v2", 5, pixel_mean=(0.5,), pixel_std=(0.25,))
    logits, features = jax.jit(functools.partial(model.apply, return_features=True))(
        variables, x)
    want_logits, want_features = np_mobilenet_v2(sd, np_normalize_nchw(x, (0.5,), (0.25,)))
    assert_close(logits, want_logits, 1e-4)
    assert_close(features, want_features, 1e-4)


def test_small_densenet_gray_matches_numpy_reference(tmp_path):
    model = DenseNet(num_classes=4, pixel_mean=(0.5,), pixel_std=(0.25,), **SMALL_DENSENET)
    x = images(1)
    template = jax.eval_shape(model.init, rng_key(0), x)
    sd = random_state_dict(densenet_layout(4, 1, **SMALL_DENSENET), seed=3)
    variables = pretrained.load_torchvision_weights(model, template,
                                                    write_safetensors(tmp_path, sd))
    logits, features = jax.jit(functools.partial(model.apply, return_features=True))(
        variables, x)
    want_logits, want_features = np_densenet(sd, np_normalize_nchw(x, (0.5,), (0.25,)),
                                             SMALL_DENSENET["block_config"])
    assert_close(logits, want_logits, 1e-4)
    assert_close(features, want_features, 1e-4)


def test_bfloat16_compute_keeps_float32_state_and_tracks_float32(resnet18_case):
    c = resnet18_case
    model = models.create("resnet18", 1000, dtype=jnp.bfloat16, pixel_mean=IMAGENET_MEAN,
                          pixel_std=IMAGENET_STD)
    logits, features = jax.jit(functools.partial(model.apply, return_features=True))(
        c["variables"], c["x"])
    assert logits.dtype == jnp.float32 and features.dtype == jnp.float32
    assert np.isfinite(logits).all()
    error = np.linalg.norm(logits - c["logits"]) / np.linalg.norm(c["logits"])
    assert 0 < error < 0.05  # bf16 really is used (not bit-equal) and stays close
    variables = jax.eval_shape(model.init, rng_key(0), c["x"])
    _, state = jax.eval_shape(functools.partial(model.apply, train=True,
                                                mutable=["batch_stats"]), variables, c["x"])
    for tree in (variables["params"], variables["batch_stats"], state["batch_stats"]):
        assert {x.dtype for x in jax.tree.leaves(tree)} == {jnp.dtype(jnp.float32)}


def test_tiny_cnn_batchnorm_train_and_eval_against_numpy():
    """Train mode normalises with batch statistics and moves the running averages by 0.1
    towards them (biased variance, flax's rule); eval mode uses and keeps the running ones."""
    model = models.create("tiny_cnn", 3, pixel_mean=(0.5,), pixel_std=(0.2,))
    x = images(2)
    template = jax.eval_shape(model.init, rng_key(0), x)
    rng = np.random.default_rng(4)
    variables = jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32),
                             template)
    flat = {k: np.asarray(v, np.float64) for k, v in
            traverse_util.flatten_dict(variables, sep="/").items()}

    def reference(train):
        h = np_normalize_nchw(x, (0.5,), (0.2,))
        stats = {}
        for conv, bn in (("conv1", "bn1"), ("conv2", "bn2")):
            h = np_conv(h, flat[f"params/{conv}/kernel"].transpose(3, 2, 0, 1), 2, 1)
            if train:
                mean, var = h.mean(axis=(0, 2, 3)), h.var(axis=(0, 2, 3))
            else:
                mean, var = flat[f"batch_stats/{bn}/mean"], flat[f"batch_stats/{bn}/var"]
            stats[bn] = (0.9 * flat[f"batch_stats/{bn}/mean"] + 0.1 * mean,
                         0.9 * flat[f"batch_stats/{bn}/var"] + 0.1 * var)
            h = (h - mean[:, None, None]) / np.sqrt(var[:, None, None] + EPS)
            h = relu(h * flat[f"params/{bn}/scale"][:, None, None]
                     + flat[f"params/{bn}/bias"][:, None, None])
        features = h.mean(axis=(2, 3))
        return features @ flat["params/fc/kernel"] + flat["params/fc/bias"], stats

    apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
    logits, state = apply(variables, x, train=True, mutable=("batch_stats",))
    want_logits, want_stats = reference(train=True)
    assert_close(logits, want_logits, 1e-4)
    for bn, (mean, var) in want_stats.items():
        np.testing.assert_allclose(state["batch_stats"][bn]["mean"], mean, rtol=1e-5)
        np.testing.assert_allclose(state["batch_stats"][bn]["var"], var, rtol=1e-5)

    logits, state = apply(variables, x, train=False, mutable=("batch_stats",))
    assert_close(logits, reference(train=False)[0], 1e-4)
    jax.tree.map(np.testing.assert_array_equal, state["batch_stats"],
                 variables["batch_stats"])


# ---------------------------------------------------------------------------------------------
# Initialisation


def initial_leaves(model, keep, x):
    """A jitted `seed -> {path: leaf}` of the initial variables whose path passes `keep`.

    Only the kept draws are compiled (XLA drops the others), which keeps these tests fast.
    """
    def init(seed):
        flat = traverse_util.flatten_dict(model.init(rng_key(seed), x), sep="/")
        return {path: value for path, value in flat.items() if keep(path)}
    return jax.jit(init)


def test_resnet18_init_is_seeded_and_torchvision_like():
    checked = ("params/conv1/kernel", "params/layer4_1/conv2/kernel", "params/fc/kernel",
               "params/fc/bias")
    init = initial_leaves(  # the draws above plus every BatchNorm leaf (convs have no bias)
        models.create("resnet18", 1000),
        lambda path: path in checked or path.startswith("batch_stats")
        or path.endswith(("/scale", "/bias")), jnp.zeros((1, 32, 32, 3)))
    first, again, other = init(0), init(0), init(1)
    jax.tree.map(np.testing.assert_array_equal, first, again)
    for path in checked:
        assert not np.allclose(first[path], other[path]), path
    # kaiming_normal_(mode='fan_out', nonlinearity='relu'): std sqrt(2 / (out * kh * kw)).
    conv = np.asarray(first["params/layer4_1/conv2/kernel"])  # [3, 3, 512, 512]
    assert conv.std() == pytest.approx(math.sqrt(2 / (512 * 9)), rel=0.01)
    assert abs(conv.mean()) < 1e-3
    stem = np.asarray(first["params/conv1/kernel"])  # [7, 7, 3, 64]
    assert stem.std() == pytest.approx(math.sqrt(2 / (64 * 49)), rel=0.05)
    # BatchNorm: weight 1, bias 0, running mean 0, running var 1 (20 BatchNorms x 4).
    batchnorm = {p: v for p, v in first.items() if p not in checked}
    assert len(batchnorm) == 80
    for path, value in batchnorm.items():
        np.testing.assert_array_equal(value, 1.0 if path.endswith(("scale", "var")) else 0.0)
    # nn.Linear's default: weight and bias U(-1/sqrt(512), 1/sqrt(512)).
    bound = 1 / math.sqrt(512)
    for path in ("params/fc/kernel", "params/fc/bias"):
        assert 0.95 * bound < np.abs(first[path]).max() <= bound


def test_mobilenet_and_densenet_init():
    """MobileNetV2: classifier N(0, 0.01), bias 0. DenseNet: kaiming_normal_ with its default
    fan_in mode, classifier bias 0. Checked on small configurations of the same classes."""
    x = jnp.zeros((1, 32, 32, 3))
    mobilenet = models.MobileNetV2(num_classes=1000, inverted_residual_setting=((1, 16, 1, 1),))
    head = initial_leaves(mobilenet, lambda path: "classifier_1" in path, x)(0)
    assert np.asarray(head["params/classifier_1/kernel"]).std() == pytest.approx(0.01, rel=0.01)
    np.testing.assert_array_equal(head["params/classifier_1/bias"], 0.0)

    densenet = DenseNet(num_classes=1000, **SMALL_DENSENET)
    leaves = initial_leaves(densenet, lambda path: "classifier" in path or "conv0" in path, x)(0)
    np.testing.assert_array_equal(leaves["params/classifier/bias"], 0.0)
    bound = 1 / math.sqrt(densenet_layout(1000, 3, **SMALL_DENSENET)["classifier.weight"][1])
    assert 0.95 * bound < np.abs(leaves["params/classifier/kernel"]).max() <= bound
    # fan_in: std sqrt(2 / (3 * 49)), where torchvision's ResNet would use sqrt(2 / (16 * 49)).
    stem = np.asarray(leaves["params/features_conv0/kernel"])  # [7, 7, 3, 16]
    assert stem.std() == pytest.approx(math.sqrt(2 / (3 * 49)), rel=0.05)


# ---------------------------------------------------------------------------------------------
# Torchvision weights


SPOT_CHECKS = {  # (torchvision key, Flax leaf path, torch -> Flax axes)
    "resnet18": [("conv1.weight", ("params", "conv1", "kernel"), (2, 3, 1, 0)),
                 ("layer1.0.conv1.weight", ("params", "layer1_0", "conv1", "kernel"),
                  (2, 3, 1, 0)),
                 ("layer2.0.downsample.0.weight",
                  ("params", "layer2_0", "downsample_0", "kernel"), (2, 3, 1, 0)),
                 ("layer2.0.downsample.1.weight",
                  ("params", "layer2_0", "downsample_1", "scale"), (0,)),
                 ("bn1.running_mean", ("batch_stats", "bn1", "mean"), (0,)),
                 ("layer4.1.bn2.running_var", ("batch_stats", "layer4_1", "bn2", "var"), (0,)),
                 ("fc.weight", ("params", "fc", "kernel"), (1, 0)),
                 ("fc.bias", ("params", "fc", "bias"), (0,))],
    "resnet50": [("layer3.5.conv3.weight", ("params", "layer3_5", "conv3", "kernel"),
                  (2, 3, 1, 0)),
                 ("layer1.0.downsample.0.weight",
                  ("params", "layer1_0", "downsample_0", "kernel"), (2, 3, 1, 0))],
    "mobilenet_v2": [("features.0.0.weight", ("params", "features_0_0", "kernel"),
                      (2, 3, 1, 0)),
                     ("features.1.conv.0.0.weight",  # depthwise [32, 1, 3, 3]
                      ("params", "features_1", "conv_0_0", "kernel"), (2, 3, 1, 0)),
                     ("features.2.conv.1.0.weight",  # depthwise [96, 1, 3, 3]
                      ("params", "features_2", "conv_1_0", "kernel"), (2, 3, 1, 0)),
                     ("features.2.conv.3.bias", ("params", "features_2", "conv_3", "bias"),
                      (0,)),
                     ("features.18.1.running_var", ("batch_stats", "features_18_1", "var"),
                      (0,)),
                     ("classifier.1.weight", ("params", "classifier_1", "kernel"), (1, 0))],
    "densenet121": [("features.denseblock1.denselayer1.norm1.weight",
                     ("params", "features_denseblock1", "denselayer1", "norm1", "scale"), (0,)),
                    ("features.denseblock3.denselayer24.conv2.weight",
                     ("params", "features_denseblock3", "denselayer24", "conv2", "kernel"),
                     (2, 3, 1, 0)),
                    ("features.transition2.conv.weight",
                     ("params", "features_transition2", "conv", "kernel"), (2, 3, 1, 0)),
                    ("features.norm5.running_mean",
                     ("batch_stats", "features_norm5", "mean"), (0,)),
                    ("classifier.weight", ("params", "classifier", "kernel"), (1, 0))],
}


def load_and_spot_check(name, tmp_path):
    """Random torchvision-layout weights loaded strictly: every tensor of the hand-written
    layout has a place in the Flax tree and vice versa; a few are compared by hand."""
    sd = random_state_dict(LAYOUTS[name](1000, 3), seed=5)
    template = abstract(name, 3, 1000)[0]
    loaded = pretrained.load_torchvision_weights(name, template, write_safetensors(tmp_path, sd))
    assert len(jax.tree.leaves(loaded)) == sum(not k.endswith("tracked") for k in sd)
    for key, path, axes in SPOT_CHECKS[name]:
        np.testing.assert_array_equal(leaf(loaded, *path), np.transpose(sd[key], axes))
    return sd, template, loaded


def test_resnet50_bottleneck_weights_load(tmp_path):
    load_and_spot_check("resnet50", tmp_path)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "densenet121"])
def test_torchvision_weights_load_and_save_round_trip(name, tmp_path):
    sd, template, loaded = load_and_spot_check(name, tmp_path)
    for suffix in (".safetensors", ".npz"):
        out = tmp_path / f"out{suffix}"
        pretrained.save_torchvision_weights(name, loaded, out)
        if suffix == ".safetensors":
            saved = safetensors.numpy.load_file(str(out))
        else:
            with np.load(out) as archive:
                saved = dict(archive)
        assert saved.keys() == sd.keys()
        for key, value in sd.items():
            want = np.zeros((), np.int64) if key.endswith("num_batches_tracked") else value
            np.testing.assert_array_equal(saved[key], want, err_msg=key)
            assert saved[key].dtype == want.dtype, key
        again = pretrained.load_torchvision_weights(name, template, out)
        jax.tree.map(np.testing.assert_array_equal, again, loaded)


def test_head_left_fresh_when_num_classes_differs(resnet18_case, tmp_path, caplog):
    rng = np.random.default_rng(6)
    fresh = jax.tree.map(lambda s: rng.normal(0, 1, s.shape).astype(np.float32),
                         abstract("resnet18", 3, 7)[0])
    path = write_safetensors(tmp_path, resnet18_case["sd"])
    with caplog.at_level(logging.WARNING, logger="rosjax.models.pretrained"):
        loaded = pretrained.load_torchvision_weights("resnet18", fresh, path)
    assert "fc.weight (1000 classes in the file, 7 in the model)" in caplog.text
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(leaf(loaded, "params", "fc", name),
                                      fresh["params"]["fc"][name])
    want = resnet18_case["sd"]["layer3.1.conv1.weight"].transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(leaf(loaded, "params", "layer3_1", "conv1", "kernel"), want)


def test_gray_model_sums_rgb_stem_kernel(resnet18_case, tmp_path):
    sd = resnet18_case["sd"]
    loaded = pretrained.load_torchvision_weights("resnet18", abstract("resnet18", 1, 1000)[0],
                                                 write_safetensors(tmp_path, sd))
    want = sd["conv1.weight"].sum(axis=1, keepdims=True).transpose(2, 3, 1, 0)  # [7, 7, 1, 64]
    np.testing.assert_allclose(leaf(loaded, "params", "conv1", "kernel"), want, rtol=1e-6)
    np.testing.assert_array_equal(leaf(loaded, "params", "bn1", "scale"), sd["bn1.weight"])


def test_strict_loader_names_every_problem_at_once(resnet18_case, tmp_path, caplog):
    sd = dict(resnet18_case["sd"])
    sd["layer1.0.conv1.weight"] = np.zeros((64, 64, 1, 1), np.float32)
    del sd["layer2.0.bn1.running_var"]
    sd["layer5.0.conv1.weight"] = np.zeros((3, 3, 3, 3), np.float32)
    path = write_safetensors(tmp_path, sd)
    template = abstract("resnet18", 3, 1000)[0]
    with pytest.raises(ValueError) as error:
        pretrained.load_torchvision_weights("resnet18", template, path)
    message = str(error.value)
    assert str(path) in message
    assert "missing from the file (1): layer2.0.bn1.running_var" in message
    assert "unexpected in the file (1): layer5.0.conv1.weight" in message
    assert ("wrong shape (1): layer1.0.conv1.weight: file (64, 64, 1, 1), "
            "model expects (64, 64, 3, 3)") in message

    # Not strict: the same problems are logged, the rest is loaded, the leaves in question keep
    # the template's values.
    rng = np.random.default_rng(7)
    concrete = jax.tree.map(lambda s: rng.normal(0, 1, s.shape).astype(np.float32), template)
    with caplog.at_level(logging.WARNING, logger="rosjax.models.pretrained"):
        loaded = pretrained.load_torchvision_weights("resnet18", concrete, path, strict=False)
    assert "layer5.0.conv1.weight" in caplog.text
    np.testing.assert_array_equal(leaf(loaded, "batch_stats", "layer2_0", "bn1", "var"),
                                  concrete["batch_stats"]["layer2_0"]["bn1"]["var"])
    np.testing.assert_array_equal(leaf(loaded, "params", "layer1_0", "conv1", "kernel"),
                                  concrete["params"]["layer1_0"]["conv1"]["kernel"])
    np.testing.assert_array_equal(leaf(loaded, "batch_stats", "layer2_0", "bn1", "mean"),
                                  sd["layer2.0.bn1.running_mean"])


def test_legacy_densenet_names_are_accepted(tmp_path):
    """torchvision's DenseNet download files spell `norm1` as `norm.1` (and so on)."""
    model = DenseNet(num_classes=4, **SMALL_DENSENET)
    template = jax.eval_shape(model.init, rng_key(0), jnp.zeros((1, 32, 32, 3)))
    sd = random_state_dict(densenet_layout(4, 3, **SMALL_DENSENET), seed=8)
    legacy = {k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): v
              for k, v in sd.items()}
    assert "features.denseblock2.denselayer1.norm.1.weight" in legacy
    new = pretrained.load_torchvision_weights(model, template, write_safetensors(tmp_path, sd))
    old = pretrained.load_torchvision_weights(
        model, template, write_safetensors(tmp_path, legacy, "legacy.safetensors"))
    jax.tree.map(np.testing.assert_array_equal, old, new)


def test_file_and_model_errors(resnet18_case, tmp_path):
    variables = resnet18_case["variables"]
    with pytest.raises(ValueError, match=r"unsupported suffix '\.pth'"):
        pretrained.save_torchvision_weights("resnet18", variables, tmp_path / "w.pth")
    with pytest.raises(ValueError, match=r"unsupported suffix '\.pt'"):
        pretrained.load_torchvision_weights("resnet18", variables, tmp_path / "w.pt")
    with pytest.raises(ValueError, match="no 'features.0.0' layer"):
        pretrained.save_torchvision_weights("mobilenet_v2", variables, tmp_path / "w.npz")
    with pytest.raises(ValueError, match="cache/fc/kernel has no torchvision counterpart"):
        pretrained.save_torchvision_weights(
            "tiny_cnn", {"cache": {"fc": {"kernel": np.zeros((2, 2))}}}, tmp_path / "w.npz")


@pytest.mark.parametrize("name", [*models.MODEL_NAMES, "densenet21"])
def test_min_image_size_is_where_the_logits_stop_being_finite(name):
    """Checked by running the network: finite logits at `min_image_size` (and at 8 px, the
    pipeline's floor, where that is larger), NaN one pixel below it."""
    model = models.create(name, 3)
    smallest = models.min_image_size(name)

    def finite_at(size):
        x = jnp.full((1, size, size, 3), 0.5)
        variables = jax.eval_shape(model.init, rng_key(0), x)
        variables = jax.tree.map(lambda s: jnp.full(s.shape, 0.01, s.dtype), variables)
        return bool(jnp.isfinite(model.apply(variables, x, train=False)).all())

    assert finite_at(max(smallest, 8))
    if smallest > 1:
        assert not finite_at(smallest - 1)
