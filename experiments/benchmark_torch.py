"""PyTorch side by side: the same train steps in torchvision and in rosjax, in one process.

Optional: PyTorch is not a dependency of rosjax. Install it into the environment first,

  pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu     # CPU
  pip install torch torchvision --index-url https://download.pytorch.org/whl/cu126   # CUDA

Times, on random data of the same shapes, the supervised train step of the five teachers
(torchvision resnet18/34/50, mobilenet_v2, densenet121; SGD momentum 0.9, weight decay 2e-4,
cross-entropy) and the online distillation step (student + frozen teachers in eval mode, loss
alpha tau^2 sum_m w_m KL(q_m || p) + (1 - alpha) CE with Exp(1) weights normalised to sum 1,
as rosjax's default), written the way a tuned PyTorch user would: bf16 autocast when the dtype
is bfloat16, channels_last on a GPU, `torch.compile` with --compile. The rosjax side is
experiments/benchmark.py's compiled steps (`prepare_teacher`, `prepare_online_distill`).
The two sides are timed interleaved, `--repeats` times each, and the median is reported, so a
machine shared with other work slows both alike.

  python -m experiments.benchmark_torch --image-size 128 --batch-size 32 --out torch.json
  python -m experiments.benchmark_torch --tiny          # resnet18 at 32 px, seconds to a minute
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import jax

from experiments import benchmark
from rosjax.config import PAPER_TEACHERS
from rosjax.train import parallel

DEFAULTS = dict(image_size=128, batch_size=32, steps=3, warmup=1, archs=",".join(PAPER_TEACHERS),
                teachers=",".join(PAPER_TEACHERS), student="resnet18", dtype="float32",
                num_classes=8, repeats=3)
TINY = dict(DEFAULTS, image_size=32, batch_size=4, steps=1, archs="resnet18",
            teachers="resnet18", repeats=1)
TAU, ALPHA = 0.5, 0.9  # those of benchmark.prepare_online_distill


def torch_setup(dtype: str, use_compile: bool):
    """(torch, device, autocast context factory, memory format, wrap) for this machine."""
    import torch
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = dtype == "bfloat16"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    wrap = torch.compile if use_compile else (lambda f: f)
    return torch, device, autocast, memory_format, wrap


def import_torchvision():
    """`import torchvision`, also where its compiled ops do not load.

    A CUDA build of torchvision next to a CPU build of torch (what a PyPI mirror without
    PyTorch's own index installs) cannot load its C++ ops, and its import then fails on
    registering fakes for the detection ops `nms`/`qnms`. The classification models use none
    of them: declaring their schemas (no kernel) lets the import go through.
    """
    import torch
    try:
        import torchvision
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
        lib = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import_torchvision.library = lib  # keep the definitions alive
        import torchvision
    return torchvision


def torch_model(torch, arch: str, num_classes: int, device, memory_format):
    torchvision = import_torchvision()
    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    return model.to(device=device, memory_format=memory_format)


def kd_loss(logits, teacher_logits, labels, weights, tau: float = TAU, alpha: float = ALPHA):
    """alpha tau^2 mean_b sum_m w_m KL(q_m || p) + (1 - alpha) CE, rosjax.losses.kd_loss in torch.

    logits [B, C], teacher_logits [K, B, C], labels int [B], weights [K].
    """
    import torch.nn.functional as F
    log_p = F.log_softmax(logits / tau, dim=-1)  # [B, C]
    log_q = F.log_softmax(teacher_logits / tau, dim=-1)  # [K, B, C]
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)  # [K, B]
    kd = tau ** 2 * (weights[:, None] * kl).sum(0).mean()
    return alpha * kd + (1 - alpha) * F.cross_entropy(logits, labels)


def torch_timer(kind: str, dtype: str, args) -> Callable[[], float]:
    """A function that runs `args.warmup` + `args.steps` torch steps and returns images/s of
    the timed ones. kind: an architecture (supervised step) or 'distill' (online KD step)."""
    torch, device, autocast, memory_format, wrap = torch_setup(dtype, args.compile)
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.rand((args.batch_size, 3, args.image_size, args.image_size), generator=gen,
                        device=device).contiguous(memory_format=memory_format)  # [B, 3, S, S]
    labels = torch.randint(0, args.num_classes, (args.batch_size,), generator=gen, device=device)
    arch = args.student if kind == "distill" else kind
    model = torch_model(torch, arch, args.num_classes, device, memory_format).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=2e-4)
    F = torch.nn.functional
    teachers = []
    if kind == "distill":
        teachers = [torch_model(torch, a, args.num_classes, device, memory_format).eval()
                    .requires_grad_(False) for a in args.teachers]

    def loss_fn(x, y):
        with autocast():
            logits = model(x).float()  # [B, C]
            if not teachers:
                return F.cross_entropy(logits, y)
            with torch.no_grad():
                t = torch.stack([teacher(x) for teacher in teachers]).float()  # [K, B, C]
        w = torch.empty(len(teachers), device=device).exponential_(generator=gen)
        return kd_loss(logits, t, y, w / w.sum())

    loss_fn = wrap(loss_fn)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(images, labels)
        loss.backward()
        opt.step()
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run() -> float:
        for _ in range(args.warmup):
            step()
        sync()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        return args.steps * args.batch_size / (time.perf_counter() - start)

    return run


def rosjax_timer(kind: str, dtype: str, args, mesh) -> tuple[Callable[[], float], float]:
    """(a function returning images/s of one bare timing, compile seconds) for rosjax."""
    if kind == "distill":
        _, prepared = benchmark.prepare_online_distill(dtype, args, mesh)
    else:
        prepared = benchmark.prepare_teacher(kind, dtype, args, mesh)
    return (lambda: prepared.time(args)[1]), prepared.compile_s


def compare(kind: str, dtype: str, args, mesh) -> dict:
    """Interleaved repeats of both sides; the medians and their ratio."""
    rosjax_run, compile_s = rosjax_timer(kind, dtype, args, mesh)
    torch_run = torch_timer(kind, dtype, args)
    torch_run()  # first call: allocator warm-up, torch.compile's compile
    rosjax_ips, torch_ips = [], []
    for _ in range(args.repeats):
        rosjax_ips.append(rosjax_run())
        torch_ips.append(torch_run())
    r, t = statistics.median(rosjax_ips), statistics.median(torch_ips)
    return {"step": kind, "dtype": dtype, "rosjax_images_per_s": r, "torch_images_per_s": t,
            "rosjax_over_torch": r / t, "rosjax_compile_s": compile_s,
            "rosjax_runs": rosjax_ips, "torch_runs": torch_ips}


def format_table(report: dict) -> str:
    d, c = report["device"], report["config"]
    lines = [f"device: {d['device_kind']} ({d['platform']}), {d['cpu_count']} CPUs, jax "
             f"{d['jax']}, torch {report['torch']} | {c['image_size']} px, batch "
             f"{c['batch_size']}, median of {c['repeats']} x {c['steps']} steps"
             f"{', torch.compile' if c['compile'] else ''}",
             f"{'step':<26}{'dtype':<10}{'rosjax img/s':>13}{'torch img/s':>13}{'ratio':>8}"]
    for r in report["results"]:
        name = (f"distill {c['student']}+{len(c['teachers'])}T" if r["step"] == "distill"
                else r["step"])
        if "error" in r:
            lines.append(f"{name:<26}{r['dtype']:<10}  error: {r['error']}")
            continue
        lines.append(f"{name:<26}{r['dtype']:<10}{r['rosjax_images_per_s']:>13.1f}"
                     f"{r['torch_images_per_s']:>13.1f}{r['rosjax_over_torch']:>8.2f}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, kind in (("image-size", int), ("batch-size", int), ("steps", int),
                       ("warmup", int), ("archs", str), ("teachers", str), ("student", str),
                       ("dtype", str), ("num-classes", int), ("repeats", int)):
        parser.add_argument(f"--{name}", type=kind, help=f"default {DEFAULTS[name.replace('-', '_')]}")
    parser.add_argument("--no-distill", dest="distill", action="store_false",
                        help="skip the online distillation step")
    parser.add_argument("--compile", action="store_true", help="torch.compile the torch steps")
    parser.add_argument("--tiny", action="store_true", help="resnet18 at 32 px, one repeat")
    parser.add_argument("--out", help="write the figures here as JSON")
    args = parser.parse_args(argv)
    benchmark.complete_args(parser, args, TINY if args.tiny else DEFAULTS, {"dtype": benchmark.DTYPES})
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        import torch
    except ImportError:
        sys.exit("experiments.benchmark_torch needs PyTorch: pip install torch torchvision "
                 "--index-url https://download.pytorch.org/whl/cpu (or .../whl/cu126 for CUDA)")
    mesh = parallel.make_mesh(jax.devices()[:1])  # one device, as the torch side has
    report = {"device": benchmark.device_info(), "torch": torch.__version__,
              "torch_threads": torch.get_num_threads(),
              "config": {k: v for k, v in vars(args).items() if k != "out"}, "results": []}
    report["device"]["device_count"] = 1
    kinds = list(args.archs) + (["distill"] if args.distill else [])
    for dtype in args.dtype:
        for kind in kinds:
            try:
                report["results"].append(compare(kind, dtype, args, mesh))
            except Exception as e:  # noqa: BLE001 - report a failed cell and go on
                report["results"].append({"step": kind, "dtype": dtype,
                                          "error": f"{type(e).__name__}: {e}"})
            print(f"{kind} {dtype} done", file=sys.stderr, flush=True)
            if args.out:  # after every cell: a run cut short keeps what it measured
                with open(args.out, "w") as f:
                    json.dump(report, f, indent=2)
    print(format_table(report))
    return report


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
