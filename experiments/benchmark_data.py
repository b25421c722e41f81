"""Input-pipeline throughput: decoded + augmented training images per second, per worker count.

The source mimics `tfds.data_source` over an ArrayRecord of JPEG images: it holds encoded
JPEG bytes and decodes one with PIL on every `source[row]`, so decoding runs inside grain's
map (and in the worker processes when there are any). Nothing is sent to an accelerator.

  python -m experiments.benchmark_data --image-size 224 --workers 0,1,2 --batches 20 \
      --out /tmp/data_benchmark.json
"""
from __future__ import annotations

import argparse
import io
import json
import os
import time

import numpy as np
from PIL import Image

from rosjax.data import pipeline

AUGMENTS = {"dermoscopy": pipeline.AugmentConfig.dermoscopy,
            "chest_xray": pipeline.AugmentConfig.chest_xray}


class JpegSource:
    """Random-access source of `length` records cycling over a few JPEG-encoded images."""

    def __init__(self, jpegs: list[bytes], length: int):
        self._jpegs, self._length = jpegs, length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, row: int) -> dict[str, np.ndarray]:
        with Image.open(io.BytesIO(self._jpegs[row % len(self._jpegs)])) as image:
            return {"image": np.asarray(image.convert("RGB"))}  # uint8 [H, W, 3]


def synthetic_jpegs(count: int, height: int, width: int, seed: int) -> list[bytes]:
    """Smooth random colour fields with pixel noise (compresses like a photograph), quality 90."""
    rng = np.random.default_rng(seed)
    jpegs = []
    for _ in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC), np.float32)
        pixels = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    return jpegs


def measure(source, *, workers: int, args) -> dict:
    """Images/s over `args.batches` batches after `args.warmup` batches (worker start-up)."""
    iterator = pipeline.train_iterator(
        source, np.arange(len(source)), np.zeros(len(source), np.int32),
        image_size=args.image_size, batch_size=args.batch_size, seed=0,
        augment=AUGMENTS[args.augment](), num_workers=workers, num_threads=args.threads,
        prefetch=args.prefetch, shard_index=0, shard_count=1)
    try:
        start = time.perf_counter()
        for _ in range(args.warmup):
            next(iterator)
        warm = time.perf_counter()
        for _ in range(args.batches):
            next(iterator)
        end = time.perf_counter()
    finally:
        iterator.close()
    return {"workers": workers, "images_per_s": args.batches * args.batch_size / (end - warm),
            "warmup_s": warm - start}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=224, help="output side S in pixels")
    parser.add_argument("--source-size", default="450x600",
                        help="stored JPEG size HxW (ISIC at 600 px on the long side is 450x600)")
    parser.add_argument("--workers", default="0,1,2",
                        help="comma-separated grain worker-process counts to measure")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per setting")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="grain reader threads per process")
    parser.add_argument("--prefetch", type=int, default=2, help="batches buffered per process")
    parser.add_argument("--augment", choices=sorted(AUGMENTS), default="dermoscopy")
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    height, width = (int(v) for v in args.source_size.lower().split("x"))
    worker_counts = [int(w) for w in args.workers.split(",")]
    length = (args.warmup + args.batches) * args.batch_size
    source = JpegSource(synthetic_jpegs(64, height, width, seed=0), length)
    results = []
    print(f"{args.image_size}-px {args.augment} batches of {args.batch_size} from "
          f"{height}x{width} JPEGs, {args.threads} threads/process, {os.cpu_count()} CPUs")
    for workers in worker_counts:
        result = measure(source, workers=workers, args=args)
        results.append(result)
        print(f"workers={workers}: {result['images_per_s']:8.1f} images/s "
              f"(warm-up {result['warmup_s']:.1f} s)", flush=True)
    report = {"image_size": args.image_size, "source_size": [height, width],
              "batch_size": args.batch_size, "threads": args.threads, "prefetch": args.prefetch,
              "augment": args.augment, "cpu_count": os.cpu_count(), "results": results}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
