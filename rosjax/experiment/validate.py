"""Start-up checks of an experiment: every option, and every training set against its batch.

Options are checked before anything is written to the work directory, so a typo costs a
second, not the hours of training that used to run before the first use of the option failed.
Two passes:

* `check_options(cfg, stages, settings, devices)` — the configuration alone: allowed values and
  ranges of every field, architectures, batch sizes against the device count, warm-up and
  milestones against the epochs, stages against settings. Milliseconds.
* `check_batches(cfg, load, stages)` — once the dataset is prepared: every training set the
  requested stages will use (each teacher's subset, the training split, each sweep point's and
  each fold's subsets) must fill one batch. It recomputes subsets from seeds, decoding nothing.

Each returns nothing or raises `ConfigError` with one line per bad option, each naming it as
the user types it (`--distill.tau=0: must be > 0`).
"""
from __future__ import annotations

import importlib.util
import math
import pathlib
from collections.abc import Callable, Sequence

from rosjax import losses
from rosjax.config import ExperimentConfig
from rosjax.data import noise as noise_lib
from rosjax.data.views import AUGMENT_ON
from rosjax.distill import weighting
from rosjax.errors import UserError
from rosjax.experiment import settings as settings_lib
from rosjax.models import MAX_WIDTH, MODEL_NAMES, SMALL_MODEL_NAMES, min_image_size

ARCHITECTURES = (*MODEL_NAMES, *SMALL_MODEL_NAMES)
DATASETS = {"isic2019": {"channels": 3, "multilabel": False, "noise": ("symmetric", "pair")},
            "nih_chestxray14": {"channels": 1, "multilabel": True, "noise": ("flip",)},
            # Your own CSV + images: channels from --data.channels, multi-label with several
            # --data.label_columns or a --data.label_separator (see `_dataset_facts`).
            "csv_images": {"channels": 3, "multilabel": False, "noise": ("symmetric", "pair")}}
# The stored sizes of the builders (rosjax.data.*.IMAGE_SIZES), kept here so that checking
# options does not import TFDS. 512: nih_chestxray14 and csv_images only.
STORED_SIZES = (32, 64, 96, 128, 224, 256)
LARGE_STORED_SIZES = {"nih_chestxray14": (512,), "csv_images": (512,)}
NIH_VIEWS = ("both", "PA", "AP")


class ConfigError(UserError, ValueError):
    """One or more options are invalid; `str()` holds one line per bad option."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class _Problems:
    """Collects one message per bad option."""

    def __init__(self):
        self.lines: list[str] = []

    def require(self, ok: bool, option: str, value, why: str) -> None:
        if not ok:
            shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
            self.lines.append(f"--{option}={shown}: {why}")

    def one_of(self, option: str, value, allowed: Sequence) -> None:
        self.require(value in allowed, option, value, f"expected one of {', '.join(map(str, allowed))}")

    def architecture(self, option: str, name: str, image_size: int) -> None:
        """A model of the zoo that can run on --data.image_size crops."""
        self.one_of(option, name, ARCHITECTURES)
        if name in ARCHITECTURES:
            self.require(image_size >= min_image_size(name), option, name,
                         f"needs crops of at least {min_image_size(name)} px (--data.image_size={image_size}): "
                         "smaller ones leave it an empty feature map and NaN logits")

    def raise_if_any(self) -> None:
        if self.lines:
            raise ConfigError(self.lines)


def check_options(cfg: ExperimentConfig, *, stages: Sequence[str], settings: Sequence[str],
                  devices: int, workdir: pathlib.Path | None = None) -> None:
    """Checks every field of `cfg` and the requested stages; raises ConfigError listing each bad one."""
    p = _Problems()
    _check_top(p, cfg, settings)
    _check_data(p, cfg, devices)
    _check_optim(p, cfg, devices)
    _check_teachers(p, cfg, settings)
    _check_distill(p, cfg, devices)
    _check_evaluation(p, cfg)
    _check_sweeps(p, cfg, stages, settings, workdir)
    p.raise_if_any()


def _check_top(p: _Problems, cfg: ExperimentConfig, settings) -> None:
    known_settings = settings_lib.TRAINED
    p.require(cfg.seed >= 0, "seed", cfg.seed, "must be >= 0")
    p.require(all(s >= 0 for s in cfg.seeds) and len(set(cfg.seeds)) == len(cfg.seeds), "seeds", cfg.seeds,
              "distinct seeds >= 0")
    p.require(not cfg.seeds or cfg.seed in cfg.seeds, "seeds", cfg.seeds,
              f"must include --seed={cfg.seed}, whose run is the work directory itself (it also holds the "
              f"attacks, landscapes, sweeps and folds); add it, or set --seed to one of them")
    p.one_of("dtype", cfg.dtype, ("float32", "bfloat16"))
    p.require(0 < cfg.model_width <= MAX_WIDTH, "model_width", cfg.model_width,
              f"a channel multiplier in (0, {MAX_WIDTH:g}]")
    # Weight files hold width-1.0 shapes. (A file that does not exist is reported once, by its own option.)
    def exists(path: str) -> bool:
        return bool(path) and pathlib.Path(path).expanduser().is_file()

    scaled = [arch for arch, path in zip(cfg.teachers.architectures, cfg.teachers.pretrained) if exists(path)]
    scaled += [cfg.distill.student] if exists(cfg.distill.pretrained) else []
    p.require(cfg.model_width == 1 or not scaled, "model_width", cfg.model_width,
              "torchvision weight files (--teachers.pretrained, --distill.pretrained) hold width-1.0 networks; "
              "pass --model_width=1")
    for name in dict.fromkeys((*cfg.settings, *settings)):
        p.require(name in known_settings, "settings", name, f"unknown setting; valid: {', '.join(known_settings)}")
    p.require(len(set(cfg.settings)) == len(cfg.settings), "settings", cfg.settings, "a setting is named twice")
    p.require(cfg.checkpoint_every_steps >= 0, "checkpoint_every_steps", cfg.checkpoint_every_steps,
              "must be >= 0 (0: checkpoints at epoch ends only)")
    p.require(cfg.log_every_steps >= 1, "log_every_steps", cfg.log_every_steps, "must be >= 1")
    p.require(not cfg.logging.wandb or importlib.util.find_spec("wandb") is not None, "logging.wandb",
              cfg.logging.wandb, "the wandb package is not installed (pip install wandb)")


def _dataset_facts(cfg: ExperimentConfig) -> dict | None:
    """DATASETS[dataset], for csv_images completed from its label and channel options."""
    d = cfg.data
    facts = DATASETS.get(d.dataset)
    if d.dataset == "csv_images":
        multilabel = len(d.label_columns) > 1 or bool(d.label_separator)
        facts = {"channels": d.channels if d.channels in (1, 3) else 3, "multilabel": multilabel,
                 "noise": ("flip",) if multilabel else ("symmetric", "pair")}
    return facts


def _check_data(p: _Problems, cfg: ExperimentConfig, devices: int) -> None:
    d = cfg.data
    p.one_of("data.dataset", d.dataset, tuple(DATASETS))
    facts = _dataset_facts(cfg)
    sizes = (*STORED_SIZES, *LARGE_STORED_SIZES.get(d.dataset, ()))
    p.require(d.stored_size is None or d.stored_size in sizes, "data.stored_size", d.stored_size,
              f"expected one of {', '.join(map(str, sizes))}")
    p.require(d.image_size >= 8, "data.image_size", d.image_size, "must be >= 8 px")
    stored = d.stored_size or max(STORED_SIZES)
    p.require(d.image_size <= stored, "data.image_size", d.image_size,
              f"larger than the stored images ({stored} px, --data.stored_size)")
    if d.dataset == "isic2019":
        p.require(not d.labels, "data.labels", d.labels, "isic2019 has its 8 classes; leave --data.labels empty")
    elif d.dataset == "csv_images":
        p.require(not d.labels or facts["multilabel"], "data.labels", d.labels,
                  "a one-label table (one --data.label_columns, no --data.label_separator) learns all "
                  "its classes; leave --data.labels empty")
    elif d.labels and d.labels != ("all",):
        from rosjax.data.nih_chestxray14 import LABEL_NAMES  # noqa: PLC0415 (TFDS import, only when needed)
        for label in d.labels:
            p.require(label in LABEL_NAMES, "data.labels", label,
                      f"unknown finding; valid: all, or some of {', '.join(LABEL_NAMES)}")
    _check_csv_images(p, cfg)
    p.require(d.views in NIH_VIEWS, "data.views", d.views, f"expected one of {', '.join(NIH_VIEWS)}")
    p.require(d.dataset == "nih_chestxray14" or (d.views == "both" and not d.one_image_per_patient),
              "data.views" if d.views != "both" else "data.one_image_per_patient",
              d.views if d.views != "both" else d.one_image_per_patient,
              "a chest X-ray protocol option: only nih_chestxray14 has view positions and follow-ups")
    if d.split_file:
        path = pathlib.Path(d.split_file).expanduser()
        p.require(path.exists(), "data.split_file", d.split_file,
                  "no such file or folder (a split.json, or a folder of train.txt, validation.txt, test.txt)")
        p.require(d.split == "grouped", "data.split", d.split,
                  "--data.split_file fixes the split; leave --data.split at grouped")
    p.one_of("data.split", d.split, ("grouped", "official"))
    p.require(d.split != "official" or d.dataset == "nih_chestxray14", "data.split", d.split,
              "only nih_chestxray14 has official lists")
    p.require(len(d.fractions) == 3 and all(0 < f < 1 for f in d.fractions)
              and math.isclose(sum(d.fractions), 1.0, abs_tol=1e-6), "data.fractions", d.fractions,
              "three fractions (train, validation, test), each in (0, 1), summing to 1")
    p.require(d.split_seed >= 0, "data.split_seed", d.split_seed, "must be >= 0")
    p.one_of("data.noise", d.noise, ("none", *noise_lib.MODES))
    if facts is not None and d.noise != "none":
        p.require(d.noise in facts["noise"], "data.noise", d.noise,
                  f"{d.dataset} takes {' or '.join(facts['noise'])} noise")
    p.require(0.0 <= d.noise_rate <= 1.0, "data.noise_rate", d.noise_rate, "must be in [0, 1]")
    p.require(d.noise != "none" or d.noise_rate == 0.0, "data.noise_rate", d.noise_rate,
              "needs --data.noise (symmetric, pair or flip)")
    p.require(d.noise != "none" or not d.noise_validation, "data.noise_validation", d.noise_validation,
              "needs --data.noise (the validation labels get the training labels' noise)")
    p.one_of("data.augment", d.augment, ("dermoscopy", "chest_xray"))
    p.one_of("data.augment_on", d.augment_on, ("auto", *AUGMENT_ON))
    if facts is not None:
        for field in ("pixel_mean", "pixel_std"):
            value = getattr(d, field)
            p.require(len(value) in (1, facts["channels"]), f"data.{field}", value,
                      f"give 1 or {facts['channels']} values ({d.dataset} has {facts['channels']} channel(s))")
    p.require(all(s > 0 for s in d.pixel_std), "data.pixel_std", d.pixel_std, "must be > 0")
    p.require(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
    _check_batch(p, "data.eval_batch_size", d.eval_batch_size, devices)
    p.one_of("data.download", d.download, ("auto", "never"))


def _check_csv_images(p: _Problems, cfg: ExperimentConfig) -> None:
    """The csv_images options: required with csv_images, refused with the paper datasets."""
    d = cfg.data
    if d.dataset != "csv_images":
        for field in ("csv", "image_column", "label_columns", "label_separator", "group_column"):
            value = getattr(d, field)
            p.require(not value, f"data.{field}", value, "only for --data.dataset=csv_images (your own CSV)")
        p.require(d.channels is None or d.channels == DATASETS.get(d.dataset, {}).get("channels"),
                  "data.channels", d.channels, f"{d.dataset} has a fixed channel count; leave --data.channels unset")
        return
    p.require(bool(d.csv), "data.csv", d.csv, "csv_images needs the label table (a CSV path)")
    p.require(bool(d.image_column), "data.image_column", d.image_column,
              "csv_images needs the CSV column of image file names")
    p.require(len(d.label_columns) >= 1, "data.label_columns", d.label_columns,
              "csv_images needs the label column(s): one of class names, or several 0/1 columns")
    p.require(len(set(d.label_columns)) == len(d.label_columns), "data.label_columns", d.label_columns,
              "a column is named twice")
    p.require(not d.label_separator or len(d.label_columns) == 1, "data.label_separator", d.label_separator,
              "splits one column of findings; give exactly one --data.label_columns")
    p.require(d.channels in (None, 1, 3), "data.channels", d.channels, "expected 1 (greyscale) or 3 (RGB)")
    p.require(not d.group_column or d.group_column not in (d.image_column, *d.label_columns),
              "data.group_column", d.group_column, "must differ from the image and label columns")


def _check_batch(p: _Problems, option: str, value: int, devices: int) -> None:
    p.require(value >= 1, option, value, "must be >= 1")
    p.require(value < 1 or value % devices == 0, option, value,
              f"must divide by the {devices} devices (each device takes an equal share)")


def _check_optim(p: _Problems, cfg: ExperimentConfig, devices: int) -> None:
    o = cfg.optim
    p.require(o.epochs >= 1, "optim.epochs", o.epochs, "must be >= 1")
    _check_batch(p, "optim.batch_size", o.batch_size, devices)
    p.require(o.learning_rate >= 0, "optim.learning_rate", o.learning_rate,
              "must be >= 0 (0 keeps the initial or pretrained weights)")
    p.require(0 <= o.momentum < 1, "optim.momentum", o.momentum, "must be in [0, 1)")
    p.require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    if o.epochs >= 1:  # (else only --optim.epochs is named)
        p.require(all(1 <= m <= o.epochs for m in o.milestones) and list(o.milestones) == sorted(set(o.milestones)),
                  "optim.milestones", o.milestones, f"increasing epochs in 1..{o.epochs} (--optim.epochs)")
    p.require(0 < o.decay_factor <= 1, "optim.decay_factor", o.decay_factor, "must be in (0, 1]")
    p.require(o.clip_grad_norm >= 0, "optim.clip_grad_norm", o.clip_grad_norm, "must be >= 0 (0: no clipping)")
    p.one_of("optim.class_weighting", o.class_weighting, losses.CLASS_WEIGHTINGS)


def _check_teachers(p: _Problems, cfg: ExperimentConfig, settings) -> None:
    t = cfg.teachers
    p.require(len(t.architectures) >= 1, "teachers.architectures", t.architectures, "name at least one teacher")
    for arch in t.architectures:
        p.architecture("teachers.architectures", arch, cfg.data.image_size)
    p.require(0.0 <= t.overlap <= 1.0, "teachers.overlap", t.overlap, "must be in [0, 1]")
    p.require(t.subset_seed >= 0, "teachers.subset_seed", t.subset_seed, "must be >= 0")
    p.require(not t.pretrained or len(t.pretrained) == len(t.architectures), "teachers.pretrained", t.pretrained,
              f"give one file per teacher ({len(t.architectures)}; an empty entry trains that one from scratch)")
    for path in t.pretrained:
        p.require(not path or pathlib.Path(path).expanduser().is_file(), "teachers.pretrained", path, "no such file")
    # A full-split teacher takes the seed and weight file of the first subset teacher of its architecture.
    if {"single", "single_full"} & {settings_lib.get(s).teachers for s in settings if s in settings_lib.REGISTRY}:
        p.require(t.single_teacher in t.architectures, "teachers.single_teacher", t.single_teacher,
                  f"baseline II's teacher must be among --teachers.architectures ({','.join(t.architectures)})")


def _check_distill(p: _Problems, cfg: ExperimentConfig, devices: int) -> None:
    d, epochs = cfg.distill, cfg.optim.epochs
    p.architecture("distill.student", d.student, cfg.data.image_size)
    p.require(not d.pretrained or pathlib.Path(d.pretrained).expanduser().is_file(), "distill.pretrained",
              d.pretrained, "no such file")
    p.require(d.tau > 0, "distill.tau", d.tau, "the temperature must be > 0")
    p.require(0 <= d.alpha <= 1, "distill.alpha", d.alpha, "must be in [0, 1]")
    p.one_of("distill.weighting", d.weighting, ("exponential",))
    p.one_of("distill.normalize", d.normalize, weighting.NORMALIZATIONS)
    p.one_of("distill.teacher_outputs", d.teacher_outputs, ("online", "cached"))
    p.require(d.cache_views >= 1, "distill.cache_views", d.cache_views, "must be >= 1")
    _check_batch(p, "distill.cache_batch_size", d.cache_batch_size, devices)
    epoch_bound = epochs >= 1  # (else only --optim.epochs is named)
    p.require(not epoch_bound or 0 <= d.warmup_epochs < epochs, "distill.warmup_epochs", d.warmup_epochs,
              f"must be in 0..{epochs - 1}: M_smooth averages the epochs after the warm-up (--optim.epochs={epochs})")
    p.one_of("distill.bn_mode", d.bn_mode, ("recalibrate", "average"))
    p.require(d.recalibration_batches >= 0, "distill.recalibration_batches", d.recalibration_batches,
              "must be >= 0 (0: one full pass over the training split)")
    p.require(not epoch_bound or 0 <= d.rl_equal_epochs < epochs, "distill.rl_equal_epochs", d.rl_equal_epochs,
              f"must be in 0..{epochs - 1}, or the agent never acts (--optim.epochs={epochs})")
    p.require(d.rl_learning_rate > 0, "distill.rl_learning_rate", d.rl_learning_rate, "must be > 0")
    p.require(0 <= d.rl_baseline_decay < 1, "distill.rl_baseline_decay", d.rl_baseline_decay, "must be in [0, 1)")
    teachers = len(cfg.teachers.architectures)
    p.require(-teachers <= d.rl_embedding_teacher < teachers, "distill.rl_embedding_teacher", d.rl_embedding_teacher,
              f"a teacher index in {-teachers}..{teachers - 1} (negative: from the end of --teachers.architectures)")


def _check_evaluation(p: _Problems, cfg: ExperimentConfig) -> None:
    e = cfg.evaluation
    p.require(e.attack_eps > 0, "evaluation.attack_eps", e.attack_eps, "must be > 0")
    p.one_of("evaluation.attack_norm", e.attack_norm, ("2", "inf"))
    p.require(e.pgd_steps >= 1, "evaluation.pgd_steps", e.pgd_steps, "must be >= 1")
    p.require(e.attack_examples >= 0, "evaluation.attack_examples", e.attack_examples,
              "must be >= 0 (0: the whole test split)")
    p.require(e.landscape_grid >= 3, "evaluation.landscape_grid", e.landscape_grid, "must be >= 3 points per axis")
    p.require(e.landscape_examples >= 1, "evaluation.landscape_examples", e.landscape_examples, "must be >= 1")
    p.require(e.landscape_seed >= 0, "evaluation.landscape_seed", e.landscape_seed, "must be >= 0")
    p.require(e.bootstrap_resamples >= 100, "evaluation.bootstrap_resamples", e.bootstrap_resamples,
              "must be >= 100 (a 95 % percentile interval needs its tails)")
    p.require(e.bootstrap_seed >= 0, "evaluation.bootstrap_seed", e.bootstrap_seed, "must be >= 0")


def _check_sweeps(p: _Problems, cfg: ExperimentConfig, stages, settings, workdir: pathlib.Path | None) -> None:
    compared = settings_lib.COMPARED

    s = cfg.sweeps
    for value in s.overlaps:
        p.require(0.0 <= value <= 1.0, "sweeps.overlaps", value, "each overlap must be in [0, 1]")
    for arch in s.students:
        p.architecture("sweeps.students", arch, cfg.data.image_size)
    for field in ("normalizations", "per_example_normalizations"):
        values = getattr(s, field)
        for name in values:
            p.one_of(f"sweeps.{field}", name, weighting.NORMALIZATIONS)
        p.require(len(set(values)) == len(values), f"sweeps.{field}", values, "a normalisation is named twice")
    p.architecture("sweeps.fold_student", s.fold_student, cfg.data.image_size)
    p.require(len(s.fold_seeds) >= 1 and all(x >= 0 for x in s.fold_seeds)
              and len(set(s.fold_seeds)) == len(s.fold_seeds), "sweeps.fold_seeds", s.fold_seeds,
              "distinct split seeds >= 0")
    if "sweeps" in stages:
        # The sweeps compare against the main run's baseline III and RoS-KD.
        evaluated = workdir is not None and all((workdir / "eval" / f"{n}.json").exists() for n in compared)
        will_train = {"settings", "evaluate"} <= set(stages) and set(compared) <= set(settings)
        p.require(evaluated or will_train, "stage", "sweeps",
                  f"the sweeps compare against the main run: include {' and '.join(compared)} in --settings "
                  "and the stages settings,evaluate (or run them first)")


def check_batches(cfg: ExperimentConfig, load: Callable, *, stages: Sequence[str]) -> None:
    """Every training set the stages will use fills at least one batch of --optim.batch_size.

    `load(split_seed=None, overlap=None)` returns the `ExperimentData` of the main run or of a
    sweep point / fold (the CLI passes `experiment.data.load` bound to `cfg`).
    """
    batch = cfg.optim.batch_size
    p = _Problems()

    def check(data, where: str) -> None:
        sets = {"the training split": data.splits["train"],
                **{f"teacher {i}'s subset": rows for i, rows in enumerate(data.subsets)}}
        small = [f"{name} has {len(rows)}" for name, rows in sets.items() if len(rows) < batch]
        p.require(not small, "optim.batch_size", batch,
                  f"{where}: {'; '.join(small)} examples, fewer than one batch; lower --optim.batch_size "
                  "or drop that point")
        for split in ("validation", "test"):
            p.require(len(data.splits[split]) > 0, "data.fractions", cfg.data.fractions,
                      f"{where}: the {split} split is empty")

    check(load(), "main run")
    if "sweeps" in stages:
        for overlap in cfg.sweeps.overlaps:
            if overlap != cfg.teachers.overlap:
                check(load(overlap=overlap), f"overlap sweep point p={overlap:g}")
    if "folds" in stages:
        for seed in cfg.sweeps.fold_seeds:
            if seed != cfg.data.split_seed:
                check(load(split_seed=seed), f"fold with split seed {seed}")
    p.raise_if_any()
