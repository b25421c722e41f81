"""experiments.flops against FLOPs counted by hand from the architectures' layer tables."""
import functools

import jax
import jax.numpy as jnp
import pytest

from experiments import flops
from rosjax import losses, models


def conv_macs(out_side: int, out_ch: int, kernel: int, in_ch: int) -> int:
    """Multiply-adds of a square convolution: out_side^2 x out_ch outputs, kernel^2 x in_ch each."""
    return out_side * out_side * out_ch * kernel * kernel * in_ch


def resnet18_macs_224(num_classes: int) -> int:
    """torchvision ResNet-18 at 224 px, layer by layer (convolutions and the fc layer)."""
    macs = conv_macs(112, 64, 7, 3)  # stem
    macs += 4 * conv_macs(56, 64, 3, 64)  # layer1: two blocks of two 3x3 convs
    for side, ch in ((28, 128), (14, 256), (7, 512)):  # layer2..4
        macs += conv_macs(side, ch, 3, ch // 2)  # first conv, stride 2
        macs += 3 * conv_macs(side, ch, 3, ch)  # the other three 3x3 convs
        macs += conv_macs(side, ch, 1, ch // 2)  # downsample 1x1, stride 2
    return macs + 512 * num_classes


def abstract_forward(name: str, size: int, num_classes: int, batch: int = 1):
    model = models.create(name, num_classes)
    image = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                               image)
    return model, variables, image


def test_resnet18_forward_matches_hand_count_and_torchvision_figure():
    model, variables, image = abstract_forward("resnet18", 224, 1000, batch=2)
    counted = flops.count_flops(functools.partial(model.apply, train=False), variables, image)
    assert counted == 2 * 2 * resnet18_macs_224(1000)
    # torchvision's model card: 1.81 GFLOPS, which counts multiply-adds (GMAC) per image.
    assert counted / 2 / 2 == pytest.approx(1.814e9, rel=2e-3)


def tiny_macs_16(num_classes: int) -> tuple[int, int]:
    """tiny_cnn at 16 px: (first conv's MACs, all MACs) of the forward pass."""
    first = conv_macs(8, 8, 3, 3)  # conv 3x3/2, 3 -> 8
    return first, first + conv_macs(4, 16, 3, 8) + 16 * num_classes  # conv 3x3/2 8 -> 16, fc


def test_train_step_counts_forward_and_both_gradients():
    model, variables, image = abstract_forward("tiny_cnn", 16, 5, batch=4)
    labels = jax.ShapeDtypeStruct((4,), jnp.int32)

    def loss(params, batch_stats, images, labels):
        logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                train=True, mutable=["batch_stats"])
        return losses.supervised_loss(logits, labels, multilabel=False)

    first, forward = tiny_macs_16(5)
    assert flops.count_flops(loss, variables["params"], variables["batch_stats"], image,
                             labels) == 2 * 4 * forward
    # Weight gradients of every layer, input gradients of all but the first convolution
    # (the pixels are not differentiated); the strided conv's input gradient (a conv with
    # lhs_dilation 2) costs what its forward does.
    grad = jax.jit(jax.grad(loss))
    assert flops.count_flops(grad, variables["params"], variables["batch_stats"], image,
                             labels) == 2 * 4 * (3 * forward - first)


def test_scan_body_counts_length_times_and_peaks():
    def f(x, w):  # x [3, 4], w [4, 4]: 5 matmuls of 3x4 by 4x4
        return jax.lax.scan(lambda c, _: (c @ w, None), x, length=5)[0]

    assert flops.count_flops(f, jnp.ones((3, 4)), jnp.ones((4, 4))) == 5 * 2 * 3 * 4 * 4
    assert flops.peak_flop_per_s("NVIDIA H200", "bfloat16") == 989e12
    assert flops.peak_flop_per_s("cpu", "float32") is None
