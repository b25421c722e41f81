"""Cached teacher outputs: every teacher runs once per stored view, the student replays them.

After FKD (Shen & Xing, "A Fast Knowledge Distillation Framework for Visual Recognition",
ECCV 2022). Online distillation runs all K frozen teachers on every augmented batch, which
costs more than the student's own step. Instead, before distillation:

1. `build_teacher_cache` draws E augmentation views per training example (the crop box, flips,
   rotation and colour-jitter factors: an `AugmentView`, not the pixels), renders each view
   (on the devices by default, inside the teachers' program: `rosjax.data.device_augment`),
   runs all K teachers on it in one jitted program and stores views and logits under
   `directory`. It writes in batches and records its progress after each one, so a killed
   build resumes where it stopped; a complete cache is reused as it is.
2. `rosjax.distill.replay.cached_train_iterator` is the training pipeline of `rosjax.data.pipeline` with the views
   replayed: in epoch e each example gets its stored view e mod E and the teachers' logits on
   that view, as `teacher_logits` in the batch. It ships the views the way the cache was
   built (`augment_on`: stored pixels + views for the step to render, or host-rendered
   images), so the student sees the pixels the teachers saw.
3. `rosjax.distill.replay.cached_distill_step` wraps `make_distill_step`'s step for those batches: no teacher runs,
   the student's step is all that is left. The teacher weights are still drawn every step.

View e of source row r is drawn from `np.random.default_rng([seed, e, r])`, the generator the
online pipeline uses for that row in epoch e. A cached run with the cache's seed and
E >= epochs therefore trains on exactly the images of the online run with that seed.

Layout of `directory` (numpy .npy files, opened as memory maps):

    meta.json      what the cache was built from (checked on resume and on open)
    progress.json  {"done": examples written (view-major order), "total": E * N}
    rows.npy       [N] int64 source rows, in the order of the arrays below
    views.npy      [E, N] VIEW_DTYPE records (see `pack_view`)
    logits.npy     [E, N, K, C] float32 teacher logits

Host batches carry `teacher_logits` as [B, K, C]: `parallel.shard_batch` splits every leaf on
its leading axis, which must be the batch axis. `replay.cached_distill_step` turns them into the
[K, B, C] that `kd_loss` takes inside the jitted step.

Teachers built with a bfloat16 compute dtype give float32 logits (the models' contract); the
cache stores float32 either way.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

from rosjax import atomic
from rosjax.data import device_augment
from rosjax.data import views as views_lib
from rosjax.distill import steps as distill_steps
from rosjax.progress import bar
from rosjax.train import parallel

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: views rendered where `augment_on` says (device by default)
META_FILE, PROGRESS_FILE = "meta.json", "progress.json"
ROWS_FILE, VIEWS_FILE, LOGITS_FILE = "rows.npy", "views.npy", "logits.npy"

# One AugmentView as a fixed-size record; NaN marks a step that is not applied.
VIEW_DTYPE = np.dtype([("box", "<i4", (4,)),        # left, top, right, bottom (source pixels)
                       ("flips", "u1", (2,)),       # horizontal, vertical
                       ("angle", "<f8"),            # rotation in degrees
                       ("jitter", "<f4", (3,))])    # brightness, contrast, saturation factors


def pack_view(view: views_lib.AugmentView) -> np.ndarray:
    """AugmentView -> a VIEW_DTYPE record (0-d structured array); `unpack_view` inverts it."""
    record = np.zeros((), VIEW_DTYPE)
    record["box"] = view.box
    record["flips"] = (view.horizontal_flip, view.vertical_flip)
    record["angle"] = np.nan if view.angle is None else view.angle
    record["jitter"] = [np.nan if f is None else f
                        for f in (view.brightness, view.contrast, view.saturation)]
    return record


def unpack_view(record: np.ndarray) -> views_lib.AugmentView:
    """VIEW_DTYPE record -> AugmentView (the jitter factors were float32 draws: exact)."""
    optional = lambda x: None if np.isnan(x) else float(x)  # noqa: E731
    brightness, contrast, saturation = (optional(f) for f in record["jitter"])
    return views_lib.AugmentView(
        box=tuple(int(v) for v in record["box"]), horizontal_flip=bool(record["flips"][0]),
        vertical_flip=bool(record["flips"][1]), angle=optional(record["angle"]),
        brightness=brightness, contrast=contrast, saturation=saturation)


def _read_json(path: pathlib.Path) -> Any:
    return json.loads(path.read_text())


PIXEL_KEYS = ("image", device_augment.VIEW_KEY)  # the batch entries the renderer reads


# ------------------------------------------------------------------------------ the cache


@dataclasses.dataclass(frozen=True)
class TeacherCache:
    """A complete cache, opened read-only (`TeacherCache.open(directory)`)."""
    directory: pathlib.Path
    meta: dict[str, Any]
    rows: np.ndarray       # [N] int64 source rows
    views: np.ndarray      # [E, N] VIEW_DTYPE
    logits: np.ndarray     # [E, N, K, C] float32

    @classmethod
    def open(cls, directory: str | os.PathLike) -> TeacherCache:
        """Opens the cache in `directory`; raises if it is missing or unfinished."""
        directory = pathlib.Path(directory).expanduser().absolute()
        if not (directory / META_FILE).exists():
            raise FileNotFoundError(f"no teacher cache in {directory} (missing {META_FILE}): "
                                    "build it with build_teacher_cache")
        progress = _read_json(directory / PROGRESS_FILE)
        if progress["done"] != progress["total"]:
            raise RuntimeError(f"teacher cache {directory} is incomplete ({progress['done']} of "
                               f"{progress['total']} views): rerun build_teacher_cache with the "
                               "same arguments to finish it")
        return cls(directory=directory, meta=_read_json(directory / META_FILE),
                   rows=np.load(directory / ROWS_FILE),
                   views=np.load(directory / VIEWS_FILE, mmap_mode="r"),
                   logits=np.load(directory / LOGITS_FILE, mmap_mode="r"))

    @property
    def num_views(self) -> int:
        return self.logits.shape[0]

    @property
    def num_teachers(self) -> int:
        return self.logits.shape[2]

    @property
    def num_classes(self) -> int:
        return self.logits.shape[3]

    @property
    def image_size(self) -> int:
        return self.meta["image_size"]

    def positions(self, rows: np.ndarray) -> np.ndarray:
        """[n] positions of source `rows` in the cache's arrays; raises naming a missing row."""
        order = np.argsort(self.rows, kind="stable")
        found = np.searchsorted(self.rows[order], rows)
        found = np.minimum(found, len(order) - 1)
        positions = order[found]
        missing = np.flatnonzero(self.rows[positions] != rows)
        if missing.size:
            raise ValueError(f"source row {rows[missing[0]]} is not in the teacher cache "
                             f"{self.directory} ({len(self.rows)} rows): build the cache over "
                             "the rows you train on")
        return positions

    def view(self, position: int, view_index: int) -> views_lib.AugmentView:
        """The stored AugmentView `view_index` of the example at cache `position`."""
        return unpack_view(self.views[view_index, position])


# ---------------------------------------------------------------------------- building


def _checksums(variables: Sequence[Any]) -> list[float]:
    """Per teacher: sum of |x| over every array (float64, on the host), a fingerprint that
    tells teachers apart."""
    return [sum(float(np.abs(np.asarray(x, np.float64)).sum()) for x in jax.tree.leaves(v))
            for v in variables]


def _check_meta(directory: pathlib.Path, stored: dict, wanted: dict) -> None:
    """Raises ValueError naming the first build argument that differs from the stored cache."""
    for name, value in wanted.items():
        old = stored.get(name)
        same = (np.allclose(old, value, rtol=1e-4) if name == "teacher_checksums"
                and old is not None and len(old) == len(value) else old == value)
        if not same:
            shown = "different teacher weights" if name == "teacher_checksums" else (
                f"{name}={value!r}, the cache has {old!r}")
            raise ValueError(f"{directory} holds a teacher cache built from other inputs "
                             f"({shown}): use another directory or delete this one")


class _BuildBatch(grain.transforms.Map):
    """Build batch k -> views drawn for examples [start + k*B, ...) (view-major), shipped as
    `views_lib.image_batch` (padded to B rows) with their flat indices and records."""

    def __init__(self, source, rows, *, augment, seed, image_size, batch_size, start, total,
                 channels, augment_on, stored_shape):
        self._source, self._rows, self._augment, self._seed = source, rows, augment, seed
        self._image_size, self._batch_size = image_size, batch_size
        self._start, self._total = start, total
        self._shipping = dict(image_size=image_size, channels=channels, augment_on=augment_on,
                              stored_shape=stored_shape, batch_rows=batch_size)

    def map(self, k: int) -> dict[str, Any]:
        first = self._start + k * self._batch_size
        flat = np.arange(first, min(first + self._batch_size, self._total))  # [n] flat indices
        images, views, rows = [], [], []
        for f in flat.tolist():
            view_index, position = divmod(f, len(self._rows))
            rows.append(int(self._rows[position]))
            images.append(views_lib.checked_image(self._source[rows[-1]], rows[-1]))
            views.append(views_lib.draw_view(*images[-1].shape, self._augment,
                                            np.random.default_rng([self._seed, view_index, rows[-1]])))
        records = np.array([pack_view(v) for v in views], VIEW_DTYPE)  # [n]
        pixels = views_lib.image_batch(images, views, rows, **self._shipping)
        return {**pixels, "flat": flat, "views": records}


@functools.lru_cache(maxsize=4)
def teacher_forward(apply_fns: tuple[Callable, ...], mesh: jax.sharding.Mesh) -> Callable:
    """Jitted (variables of K teachers, pixels) -> logits [B, K, C] float32.

    pixels: {'image': float32 [B, S, S, C]} or a shipped {'image': uint8, 'view': ...}, which
    is rendered inside this program (`device_augment.render`). Memoised, so repeated builds
    with the same teacher modules compile once per process.
    """
    def forward(variables, pixels):
        images = device_augment.render(pixels)["image"]  # [B, S, S, C]
        return jnp.swapaxes(distill_steps.teacher_logits(apply_fns, variables, images), 0, 1)
    return jax.jit(forward, in_shardings=(parallel.replicated(mesh), parallel.data_sharding(mesh)),
                   out_shardings=parallel.data_sharding(mesh))


def _open_arrays(directory: pathlib.Path, meta: dict, rows: np.ndarray):
    """Writable views [E, N] and logits [E, N, K, C] maps: the existing ones after checking
    that `meta` and `rows` match them, else new files (meta.json written last)."""
    shapes = (meta["num_views"], meta["num_rows"])
    if (directory / META_FILE).exists():
        _check_meta(directory, _read_json(directory / META_FILE), meta)
        if not np.array_equal(np.load(directory / ROWS_FILE), rows):
            raise ValueError(f"{directory} holds a teacher cache of other rows: use another "
                             "directory or delete this one")
        mode = "r+"
    else:
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / ROWS_FILE, rows)
        mode = "w+"
    views = np.lib.format.open_memmap(directory / VIEWS_FILE, mode=mode, dtype=VIEW_DTYPE,
                                      shape=shapes)
    logits = np.lib.format.open_memmap(
        directory / LOGITS_FILE, mode=mode, dtype=np.float32,
        shape=shapes + (meta["num_teachers"], meta["num_classes"]))
    if mode == "w+":
        views.flush()
        logits.flush()
        atomic.write_json(directory / PROGRESS_FILE, {"done": 0, "total": shapes[0] * shapes[1]})
        atomic.write_json(directory / META_FILE, meta)  # last: its presence means the files exist
    return views, logits


def build_teacher_cache(teachers: Sequence[tuple[Callable, Any]], source, rows, *,
                        image_size: int, augment: views_lib.AugmentConfig, num_views: int,
                        seed: int, batch_size: int, directory: str | os.PathLike,
                        mesh: jax.sharding.Mesh | None = None, num_threads: int = 2,
                        prefetch: int = 2, augment_on: str = "device",
                        stored_shape: tuple[int, int] | None = None) -> TeacherCache:
    """Runs every teacher on `num_views` stored views of each example; resumable.

    Args:
      teachers: (apply_fn, variables) per teacher, frozen (eval mode).
      source: random-access source, `source[row]['image']` uint8 [H, W, C].
      rows: [N] source rows to cache (the training split).
      image_size: side of the rendered views (the student's training size).
      augment: the augmentation the views are drawn from.
      num_views: E, views per example; epoch e of training replays view e mod E.
      seed: view e of row r is drawn from default_rng([seed, e, r]), as the online pipeline
        draws epoch e of a run with this seed.
      batch_size: images per teacher forward; a multiple of the mesh's device count.
      directory: where the cache lives; an unfinished cache there is resumed, a finished one
        is opened, one built from other inputs is an error.
      mesh: devices of this process to run the teachers on (default: all local devices).
        The build runs in one process; in a multi-host job build the cache beforehand.
      num_threads, prefetch: grain reader threads and batches rendered ahead.
      augment_on, stored_shape: where the views are rendered and the shape the pixels are
        shipped in, as in `pipeline.train_dataset`; the replay ships them the same way.
    Returns the opened TeacherCache. Labels play no part: label-noise variants share a cache.
    """
    if not teachers:
        raise ValueError("build_teacher_cache needs at least one teacher")
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    rows = np.asarray(rows)
    if rows.ndim != 1 or rows.size == 0 or rows.dtype.kind not in "iu":
        raise ValueError(f"rows must be a non-empty 1-D integer array, got {rows.dtype} "
                         f"{rows.shape}")
    if rows.min() < 0 or rows.max() >= len(source):
        raise ValueError(f"rows reach outside the source (len {len(source)}): "
                         f"min {rows.min()}, max {rows.max()}")
    rows = rows.astype(np.int64)
    views_lib.check_augment_on(augment_on)
    stored_shape = views_lib.stored_shape_of(source, rows, stored_shape)
    mesh = mesh or parallel.make_mesh(jax.local_devices())
    if batch_size < 1 or batch_size % mesh.devices.size:
        raise ValueError(f"batch_size={batch_size} must be a positive multiple of the "
                         f"{mesh.devices.size} devices of the mesh")
    directory = pathlib.Path(directory).expanduser().absolute()
    apply_fns = tuple(apply for apply, _ in teachers)
    variables = jax.device_put(tuple(v for _, v in teachers), parallel.replicated(mesh))
    first = views_lib.checked_image(source[int(rows[0])], int(rows[0]))
    forward = teacher_forward(apply_fns, mesh)
    image_shape = (batch_size, image_size, image_size, first.shape[2])
    out = jax.eval_shape(forward, variables, {"image": jax.ShapeDtypeStruct(image_shape, jnp.float32)})
    num_examples, (_, num_teachers, num_classes) = len(rows), out.shape
    total = num_views * num_examples
    meta = {"version": CACHE_VERSION, "num_rows": num_examples, "num_views": num_views,
            "seed": seed, "image_size": image_size, "channels": int(first.shape[2]),
            "augment": dataclasses.asdict(augment), "augment_on": augment_on,
            "stored_shape": list(stored_shape), "num_teachers": num_teachers,
            "num_classes": num_classes, "teacher_checksums": _checksums(variables)}
    meta["augment"] = json.loads(json.dumps(meta["augment"]))  # tuples as JSON lists

    views, logits = _open_arrays(directory, meta, rows)
    done = _read_json(directory / PROGRESS_FILE)["done"]
    if done < total:
        log.info("teacher cache: %d teachers on %d views of %d examples%s", num_teachers, num_views,
                 num_examples, f" (resuming at {done} of {total})" if done else "")
        _fill(forward, variables, source, rows, views, logits, directory, augment=augment,
              seed=seed, image_size=image_size, batch_size=batch_size, start=done, total=total,
              mesh=mesh, num_threads=num_threads, prefetch=prefetch,
              shipping=dict(channels=int(first.shape[2]), augment_on=augment_on,
                            stored_shape=stored_shape))
    del views, logits  # close the writable maps before reopening read-only
    return TeacherCache.open(directory)


def _fill(forward, variables, source, rows, views, logits, directory, *, augment, seed,
          image_size, batch_size, start, total, mesh, num_threads, prefetch, shipping) -> None:
    """Writes examples [start, total) batch by batch, recording progress after each batch.

    The teachers run on batch k+1 while batch k is written (jax dispatch is asynchronous),
    and grain threads render the next views meanwhile.
    """
    flat_views = views.reshape(-1)                                # [E * N]
    flat_logits = logits.reshape(-1, *logits.shape[2:])           # [E * N, K, C]
    num_batches = math.ceil((total - start) / batch_size)
    batches = grain.MapDataset.range(num_batches).map(_BuildBatch(
        source, rows, augment=augment, seed=seed, image_size=image_size,
        batch_size=batch_size, start=start, total=total, **shipping))
    batches = batches.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                        prefetch_buffer_size=prefetch))
    progress = bar(num_batches, "teacher cache")

    def write(host, device_logits, k):
        flat = host["flat"]
        flat_logits[flat] = np.asarray(device_logits)[:len(flat)]  # [n, K, C]
        flat_views[flat] = host["views"]
        views.flush()
        logits.flush()
        atomic.write_json(directory / PROGRESS_FILE, {"done": int(flat[-1]) + 1, "total": total})
        progress.update(1)

    pending = None
    for k, host in enumerate(batches):
        pixels = jax.device_put({k: host[k] for k in PIXEL_KEYS if k in host},
                                parallel.data_sharding(mesh))
        launched = (host, forward(variables, pixels), k)
        if pending is not None:
            write(*pending)
        pending = launched
    if pending is not None:
        write(*pending)
    progress.close()
