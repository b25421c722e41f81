"""Experiment configuration: frozen dataclasses, JSON round-trips and command-line overrides.

Every experiment is one `ExperimentConfig` (built by `experiments/<name>.py:get_config()`).
Any field can be overridden from the command line with a dotted path:

        python -m experiments.lesion --teachers.overlap=0.2 --distill.tau=1.0 --optim.epochs=30

Values are parsed by the field's declared type (bool, int, float, str, tuples as
comma-separated lists, `None` for optional fields), so a typo in a name or a value of the wrong
type is an error naming the option, not a silent no-op.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

PAPER_TEACHERS = ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "densenet121")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    dataset: str                       # TFDS builder name: "isic2019", "nih_chestxray14" or "csv_images" (your own CSV + images).
    data_dir: str = "~/tensorflow_datasets"  # Where TFDS stores the prepared ArrayRecord files.
    manual_dir: str | None = None      # Folder with already-downloaded raw files (None: <data_dir>/downloads/manual, else download).
    stored_size: int | None = None     # Builder config (stored image side in px); None: the builder's default.
    image_size: int = 224              # Side of the crops the networks see, in px.
    labels: tuple[str, ...] = ()       # NIH: the label subset to learn (default: the 8 ChestX-ray8 labels).
    split: str = "grouped"             # "grouped" (70/10/20, no patient in two splits) or "official" (NIH lists).
    fractions: tuple[float, ...] = (0.7, 0.1, 0.2)  # train / validation / test fractions of the grouped split.
    split_seed: int = 0                # Seed of the grouped split; the paper's 3 runs use 3 seeds.
    noise: str = "none"                # Injected training-label noise: "none", "symmetric", "pair" (one-label) or "flip" (multi-label).
    noise_rate: float = 0.0            # Probability that an injected-noise label is changed.
    noise_validation: bool = False     # Inject the same noise into the validation labels too (model selection, tuned thresholds).
    augment: str = "dermoscopy"        # Augmentation preset: "dermoscopy" or "chest_xray".
    pixel_mean: tuple[float, ...] = (0.5,)  # Per-channel mean subtracted inside the model ([0, 1] pixels).
    pixel_std: tuple[float, ...] = (0.25,)  # Per-channel std divided inside the model.
    num_workers: int = 0               # grain worker processes for decoding/augmentation (0: in-process).
    # Where augmented views are rendered: "device" (in the jitted step, from uint8 stored pixels), "host"
    # (PIL) or "auto": the device on a GPU/TPU, the host on a CPU backend, where the "device" is the host
    # and rendering inside each program only adds compile time (ResNet-18's train step: 16 s against 10 s).
    augment_on: str = "auto"
    eval_batch_size: int = 128         # Global batch of evaluation passes (padded, masked).
    download: str = "auto"             # "auto": fetch missing public files; "never": fail at once naming what is missing.
    skip_corrupt_images: bool = False  # Preparation: leave out undecodable images (counted) instead of stopping.
    csv: str | None = None             # csv_images: the label table (a path, or a file name under manual_dir).
    image_column: str = ""             # csv_images: column of image file names (with or without extension).
    label_columns: tuple[str, ...] = ()  # csv_images: one column of class names, or several 0/1 columns (multi-label).
    label_separator: str = ""          # csv_images: e.g. "|": the one label column lists findings (multi-label).
    group_column: str = ""             # csv_images: patient/lesion id of the grouped split ("": each image its own group).
    channels: int | None = None        # csv_images: stored channels, 1 (greyscale) or 3 (RGB); None: 3.
    split_file: str | None = None      # Fixed split instead of --data.split: a split.json, or a folder of train/validation/test.txt ids.
    views: str = "both"                # NIH: view positions kept, "PA", "AP" or "both" (the paper).
    one_image_per_patient: bool = False  # NIH: keep only each patient's first image (lowest follow-up).


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    epochs: int = 50                   # Training epochs (paper: 50 for teachers and students).
    batch_size: int = 64               # Global batch size, split across all devices (paper: 64).
    learning_rate: float = 0.1         # Initial SGD learning rate (paper: 0.1).
    momentum: float = 0.9              # SGD momentum (paper: 0.9).
    weight_decay: float = 2e-4         # L2 added to the gradient, PyTorch-SGD style (paper: 2e-4).
    milestones: tuple[int, ...] = (25, 40)  # Epochs at which the learning rate is divided (paper: 25, 40).
    decay_factor: float = 0.1          # Multiplier applied at each milestone (paper: ÷10).
    nesterov: bool = False             # Nesterov momentum (paper: plain momentum).
    clip_grad_norm: float = 0.0        # Rescale each gradient to this global norm when above it, before weight decay (0: off, the paper).
    # Class imbalance (paper: none): "balanced" weights one-label CE by N / (C * n_c) and gives
    # BCE per-label positive weights n_neg / n_pos, from the labels of the rows each model trains
    # on (teachers: their subset; students: the training split), for teachers and students alike.
    class_weighting: str = "none"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TeachersConfig:
    architectures: tuple[str, ...] = PAPER_TEACHERS  # One teacher per subset, in subset order.
    overlap: float = 0.4               # Fraction of the training split shared by every teacher (paper: 0.4).
    subset_seed: int = 0               # Seed of the overlapping-subset draw.
    pretrained: tuple[str, ...] = ()   # Optional torchvision-layout weight files, one per teacher ("" = none).
    single_teacher: str = "densenet121"  # Baseline II's teacher (Hinton KD from one network).


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillConfig:
    student: str = "resnet18"          # Student architecture (paper default: ResNet-18).
    pretrained: str = ""               # Torchvision-layout weight file every student of --distill.student starts from ("": scratch).
    tau: float = 0.5                   # Softening temperature τ of teachers and student (paper: 0.5).
    alpha: float = 0.9                 # Weight of the KD term against the hard-label term (paper: 0.9).
    weighting: str = "exponential"     # RoS-KD teacher weights: w_m ~ Exp(1) every step.
    per_example: bool = False          # Draw weights per example instead of one draw per step.
    normalize: str = "sum1"            # "sum1": Exp(1) ÷ sum (Dirichlet, baseline III's KD strength); "none": paper's literal Exp(1); "sumk".
    teacher_outputs: str = "online"    # "online" (paper: teachers run on every batch) or "cached" (FKD-style replay).
    cache_views: int = 10              # Cached outputs: augmentation views stored per example; epoch e replays e mod E.
    cache_batch_size: int = 256        # Cached outputs: images per teacher forward while building the cache.
    warmup_epochs: int = 10            # Epochs before M_smooth starts averaging (paper: 10).
    bn_mode: str = "recalibrate"       # M_smooth BatchNorm: "recalibrate" (pass over train data) or "average".
    recalibration_batches: int = 50    # Training batches used to recompute M_smooth's BatchNorm statistics (0: a full pass).
    rl_equal_epochs: int = 10          # Baseline IV: epochs of equal-weight distillation before the agent acts.
    rl_learning_rate: float = 1e-3     # Baseline IV: Adam learning rate of the selection policy.
    rl_baseline_decay: float = 0.9     # Baseline IV: decay of the moving-average reward baseline.
    rl_embedding_teacher: int = -1     # Baseline IV: teacher whose pooled features embed an example in the agent's state (-1: the last, DenseNet-121 in the paper's order).
    rl_per_example_reward: bool = False  # Baseline IV: one reward per example (our option) instead of one per batch (Yuan et al.).


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    attack_eps: float = 128 / 255      # Radius of FGSM/PGD (paper: l2, 128/255).
    attack_norm: str = "2"             # "2" or "inf".
    pgd_steps: int = 10                # PGD iterations.
    attack_examples: int = 0           # Test examples attacked (0: the whole test split).
    landscape_grid: int = 51           # Points per axis of the loss-landscape grid on [-1, 1]².
    landscape_examples: int = 256      # Fixed test images the landscape loss is computed on.
    landscape_seed: int = 0            # Seed of the two random directions (shared by the compared models).
    bootstrap_resamples: int = 2000    # Report: resamples of the test set behind each RoS-KD − baseline interval.
    bootstrap_seed: int = 0            # Report: seed of those resamples (the same draws for every model and seed).


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepConfig:
    overlaps: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # Figure 3: teacher-subset overlap ratios.
    students: tuple[str, ...] = PAPER_TEACHERS  # Figure 2: student architectures (RoS-KD vs baseline III).
    normalizations: tuple[str, ...] = ("none", "sum1", "sumk")  # Teacher-weight sweep: RoS-KD per --distill.normalize, one draw per step.
    per_example_normalizations: tuple[str, ...] = ("sum1",)  # Teacher-weight sweep: the same with per-example draws (--distill.per_example).
    fold_seeds: tuple[int, ...] = (0, 1, 2)  # Table III (NIH): split seeds of the patient-grouped re-splits.
    fold_student: str = "densenet121"  # Table III (NIH): the re-splits' student (paper: DenseNet-121, AUROC 0.838).


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    wandb: str = ""                    # Weights & Biases project to log every run to ("": none; nothing leaves the machine).


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    name: str                          # Experiment name, used in reports.
    seed: int = 0                      # Run seed: parameter init, augmentation, injected noise, teacher-weight draws.
    # Training seeds of a multi-seed run (rosjax.experiment.seeds): every setting, teachers
    # included, trains once per seed; `seed`'s run is WORKDIR itself, each other one
    # WORKDIR/seeds/<s>/. Empty: `seed` alone. May grow between reruns (only new seeds train).
    seeds: tuple[int, ...] = ()
    dtype: str = "float32"             # Compute dtype: "float32" or "bfloat16" (params stay float32).
    # Channel multiplier of every network (rosjax.models.create's `width`): 1.0 is the paper's
    # networks and the only width ImageNet weights fit; the smoke's 0.25 keeps CPU steps short.
    model_width: float = 1.0
    data: DataConfig
    teachers: TeachersConfig = TeachersConfig()
    optim: OptimConfig = OptimConfig()
    distill: DistillConfig = DistillConfig()
    evaluation: EvalConfig = EvalConfig()
    sweeps: SweepConfig = SweepConfig()
    logging: LoggingConfig = LoggingConfig()
    settings: tuple[str, ...] = ()     # Student settings to train (rosjax.experiment.settings); empty: every one.
    checkpoint_every_steps: int = 500  # Mid-epoch checkpoint interval (a checkpoint is also written each epoch).
    log_every_steps: int = 50          # Host fetches step metrics this often (no per-step synchronisation).
    smoke: bool = False                # Small CPU run of the whole pipeline on the bundled sample files.


# --------------------------------------------------------------------------------------------
# Generic helpers: dict round-trip and dotted overrides.


def field_default(dotted: str, root: type = None) -> Any:
    """The declared default of a field of ExperimentConfig by dotted path (JSON form), or a
    sentinel object that equals nothing when the field has none or does not exist."""
    node = root or ExperimentConfig
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = typing.get_type_hints(node).get(part)
        if not dataclasses.is_dataclass(node):
            return object()
    fields = {f.name: f for f in dataclasses.fields(node)}
    if leaf not in fields or fields[leaf].default is dataclasses.MISSING:
        return object()
    default = fields[leaf].default
    return to_dict(default) if dataclasses.is_dataclass(default) else json.loads(json.dumps(default))


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-serialisable dict of a (nested) config dataclass."""
    return dataclasses.asdict(config)


def from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Rebuilds a config dataclass from `to_dict` output (tuples restored from JSON lists)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name not in values:
            continue
        kwargs[field.name] = _from_json(hints[field.name], values[field.name])
    return cls(**kwargs)


def _from_json(tp: Any, value: Any) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value)
    if typing.get_origin(tp) is tuple and value is not None:
        return tuple(value)
    if _optional_inner(tp) is not None and value is not None:
        return _from_json(_optional_inner(tp), value)
    return value


def save_json(config: Any, path) -> None:
    with open(path, "w") as f:
        json.dump(to_dict(config), f, indent=2, sort_keys=True)


def apply_overrides(config: Any, overrides: dict[str, str]) -> Any:
    """Returns `config` with dotted-path string overrides applied, e.g. {"optim.epochs": "5"}."""
    for path, text in overrides.items():
        config = _replace_path(config, path.split("."), text, path)
    return config


def _replace_path(node: Any, parts: list[str], text: str, full: str) -> Any:
    if not dataclasses.is_dataclass(node):
        raise ValueError(f"--{full}: {'.'.join(parts)!r} is not inside a config section")
    names = {f.name for f in dataclasses.fields(node)}
    if parts[0] not in names:
        raise ValueError(f"--{full}: unknown option {parts[0]!r}; valid here: {', '.join(sorted(names))}")
    hint = typing.get_type_hints(type(node))[parts[0]]
    if len(parts) == 1:
        if dataclasses.is_dataclass(hint):
            raise ValueError(f"--{full} names a whole section; set one of its fields instead")
        return dataclasses.replace(node, **{parts[0]: _parse(hint, text, full)})
    child = _replace_path(getattr(node, parts[0]), parts[1:], text, full)
    return dataclasses.replace(node, **{parts[0]: child})


def _optional_inner(tp: Any) -> Any:
    """For `X | None` returns X, else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def _parse(tp: Any, text: str, full: str) -> Any:
    inner = _optional_inner(tp)
    if inner is not None:
        return None if text.lower() in ("none", "null", "") else _parse(inner, text, full)
    if typing.get_origin(tp) is tuple:
        (item_type, *_) = typing.get_args(tp)
        if not text.strip():
            return ()
        # Empty entries are kept for strings ("a.npz,,c.npz": no file for the second teacher).
        items = [t for t in text.split(",") if item_type is str or t.strip()]
        return tuple(_parse(item_type, t.strip(), full) for t in items)
    try:
        if tp is bool:
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return lowered in ("true", "1", "yes")
        if tp in (int, float, str):
            return tp(text)
    except ValueError:
        raise ValueError(f"--{full}: expected {tp.__name__}, got {text!r}") from None
    raise ValueError(f"--{full}: cannot parse values of type {tp}")
