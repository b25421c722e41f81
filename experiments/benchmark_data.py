"""Input-pipeline throughput: decoded + augmented training images per second, per worker count.

The source mimics `tfds.data_source` over an ArrayRecord of JPEG images: it holds encoded
JPEG bytes and decodes one on every `source[row]` (with PIL, which TFDS falls back to without
OpenCV), so decoding runs inside grain's map (and in the worker processes when there are any).
Nothing is sent to an accelerator. Per worker count it reports

* `images_per_s`: the training iterator over `--source-size` JPEGs;
* `host_images_per_s`: the same iterator over JPEGs of the stored size (`--stored-size`, 256 px
  as the rosjax builders store them): the host part of a real run, stored JPEG to a batch
  ready to ship; `host_over_decode` is its ratio to the bare decode rate below;
* `host_images_per_s_simplejpeg` when simplejpeg (libjpeg-turbo) is installed: the same with
  that decoder, to see whether a faster decoder pays for itself in the whole host part;

and once, `decode_images_per_s`: a bare PIL decode loop over the same stored files, one thread
(and `decode_images_per_s_simplejpeg`).

  python -m experiments.benchmark_data --image-size 224 --workers 0,1,2 --batches 20 \
      --out /tmp/data_benchmark.json
  python -m experiments.benchmark_data --tiny            # seconds: 16 px, 2 batches
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import time

import numpy as np
from PIL import Image

from rosjax.data import pipeline
from rosjax.data import views as views_lib

AUGMENTS = {"dermoscopy": views_lib.AugmentConfig.dermoscopy,
            "chest_xray": views_lib.AugmentConfig.chest_xray}


def decode_pil(jpeg: bytes) -> np.ndarray:
    """JPEG bytes -> uint8 [H, W, 3] with PIL."""
    with Image.open(io.BytesIO(jpeg)) as image:
        return np.asarray(image.convert("RGB"))


def decode_simplejpeg(jpeg: bytes) -> np.ndarray:
    """JPEG bytes -> uint8 [H, W, 3] with simplejpeg (libjpeg-turbo; the same pixels as PIL's
    libjpeg-turbo at its default, accurate DCT and upsampling)."""
    import simplejpeg
    return simplejpeg.decode_jpeg(jpeg, colorspace="RGB")


def decoders() -> dict:
    """The decoders to time: PIL always, simplejpeg when it is installed."""
    found = {"pil": decode_pil}
    if importlib.util.find_spec("simplejpeg") is not None:
        found["simplejpeg"] = decode_simplejpeg
    return found


class JpegSource:
    """Random-access source of `length` records cycling over a few JPEG-encoded images."""

    def __init__(self, jpegs: list[bytes], length: int, decode=decode_pil):
        self._jpegs, self._length, self._decode = jpegs, length, decode

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, row: int) -> dict[str, np.ndarray]:
        return {"image": self._decode(self._jpegs[row % len(self._jpegs)])}  # uint8 [H, W, 3]


def decode_rate(jpegs: list[bytes], decode, count: int) -> float:
    """Images/s of a bare, single-threaded decode loop over `count` images cycling `jpegs`."""
    decode(jpegs[0])
    start = time.perf_counter()
    for i in range(count):
        decode(jpegs[i % len(jpegs)])
    return count / (time.perf_counter() - start)


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


# Defaults of a normal run and of --tiny; a flag given on the command line wins over both.
DEFAULTS = dict(image_size=224, source_size="450x600", stored_size=256, workers="0,1,2",
                batches=20, warmup=2, batch_size=32)
TINY = dict(image_size=16, source_size="40x48", stored_size=32, workers="0", batches=2, warmup=1,
            batch_size=8)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, help="output side S in pixels (224)")
    parser.add_argument("--source-size",
                        help="JPEG size HxW of images_per_s (450x600: ISIC at 600 px long side)")
    parser.add_argument("--stored-size", type=int,
                        help="side of the square stored JPEGs of host_images_per_s (256)")
    parser.add_argument("--workers", help="comma-separated grain worker-process counts (0,1,2)")
    parser.add_argument("--batches", type=int, help="timed batches per setting (20)")
    parser.add_argument("--warmup", type=int, help="untimed batches first (2)")
    parser.add_argument("--batch-size", type=int, help="(32)")
    parser.add_argument("--threads", type=int, default=2, help="grain reader threads per process")
    parser.add_argument("--prefetch", type=int, default=2, help="batches buffered per process")
    parser.add_argument("--augment", choices=sorted(AUGMENTS), default="dermoscopy")
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke configuration")
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    for name, value in (TINY if args.tiny else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def keyed(base: str, decoder: str) -> str:
    """JSON key of a figure: `base` for PIL, `base_<decoder>` for another decoder."""
    return base if decoder == "pil" else f"{base}_{decoder}"


def main(argv=None) -> dict:
    args = parse_args(argv)
    height, width = (int(v) for v in args.source_size.lower().split("x"))
    worker_counts = [int(w) for w in args.workers.split(",")]
    length = (args.warmup + args.batches) * args.batch_size
    source = JpegSource(synthetic_jpegs(64, height, width, seed=0), length)
    stored = synthetic_jpegs(64, args.stored_size, args.stored_size, seed=1)
    found = decoders()
    decode = {name: decode_rate(stored, fn, max(length, 64)) for name, fn in found.items()}
    print(f"{args.image_size}-px {args.augment} batches of {args.batch_size} from "
          f"{height}x{width} JPEGs (host part: {args.stored_size}-px JPEGs), {args.threads} "
          f"threads/process, {os.cpu_count()} CPUs; bare decode of the stored JPEGs, 1 thread: "
          + ", ".join(f"{name} {rate:.0f}/s" for name, rate in decode.items()))
    results = []
    for workers in worker_counts:
        result = measure(source, workers=workers, args=args)
        for name, fn in found.items():
            host = measure(JpegSource(stored, length, fn), workers=workers, args=args)
            result[keyed("host_images_per_s", name)] = host["images_per_s"]
            result[keyed("host_over_decode", name)] = host["images_per_s"] / decode[name]
        results.append(result)
        hosts = ", ".join(f"{name} {result[keyed('host_images_per_s', name)]:.1f}"
                          for name in found)
        print(f"workers={workers}: {result['images_per_s']:8.1f} images/s (warm-up "
              f"{result['warmup_s']:.1f} s); host part: {hosts} images/s", flush=True)
    report = {"image_size": args.image_size, "source_size": [height, width],
              "stored_size": args.stored_size, "batch_size": args.batch_size,
              "threads": args.threads, "prefetch": args.prefetch, "augment": args.augment,
              "cpu_count": os.cpu_count(),
              **{keyed("decode_images_per_s", name): rate for name, rate in decode.items()},
              "results": results}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
