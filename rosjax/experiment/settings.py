"""The registry of an experiment's settings: baselines I–V, RoS-KD and their protocol variants, one entry each.

Every stage reads this table and nothing else about settings: the CLI (which names exist),
training (which teachers, which step, smoothing or not), the artifacts (where a setting's
final model lives), evaluation (what is scored, what the attacks and landscapes compare),
the sweeps and folds (which settings they rerun) and the report (titles and row order).
Adding a setting is one `Setting(...)` entry below plus its test.

A setting either trains (its own folder `WORKDIR/settings/<name>/`) or reads a model another
setting's run exports (`trained_by`): baseline V is the raw student of the RoS-KD run, whose
final model is M_smooth.

Teachers come in two kinds: the k subset teachers of the paper's protocol (`WORKDIR/teachers/
<i>-<arch>/`, teacher i on its overlapping subset) and full-split teachers (`WORKDIR/teachers/
full_<arch>/`, one per architecture, trained on the whole training split), which baseline II
(the paper's Hinton KD from one DenseNet-121) and the traditional baseline III distil from.
The teachers stage trains the full-split ones the requested settings name (`full_teachers`).

The RoS-KD variants with a fixed weight normalisation (Table I rows separating the weights'
randomness from their scale) are skipped by default when they would repeat the RoS-KD run
itself (`same_run_as`), and the smoke run leaves out the settings marked `smoke=False`.
"""
from __future__ import annotations

import dataclasses
import logging

from rosjax.config import ExperimentConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Setting:
    """One row of Table I: how its student is trained, exported, evaluated and reported."""
    name: str                    # the command-line name, the work-directory folder, the report key
    title: str                   # its row title in the report
    teachers: str                # "none" (labels only), "single" (--teachers.single_teacher's subset
    #                              teacher), "all" (the k subset teachers), "single_full" (one teacher,
    #                              --teachers.single_teacher, trained on the whole training split) or
    #                              "all_full" (one full-split teacher per architecture)
    trainer: str = "distill"     # "distill" (the KD step; plain CE without teachers) or "rl" (baseline IV)
    weighting: str = "equal"     # teacher weights of the KD step: "equal" (1/K) or "exponential" (random)
    weight_options: bool = False  # takes --distill.normalize and --distill.per_example (RoS-KD's draws)
    normalize: str | None = None  # a fixed normalisation of the exponential weights (instead of the option)
    smoothing: bool = False      # also exports M_smooth, the running mean of the epoch weights
    model: str = "student"       # the exported model its numbers come from: "student" or "smooth"
    trained_by: str | None = None  # the setting whose run exports this one's model (None: its own)
    compared: bool = False       # in Table II, Figure 4 and the sweeps (baseline III against RoS-KD)
    folds: bool = False          # the setting NIH's split-seed runs (Table III) train
    smoke: bool = True           # trained by default in a --smoke run (False: more run time than a smoke affords)

    @property
    def folder(self) -> str:
        """The folder under WORKDIR/settings/ that holds this setting's training run."""
        return self.trained_by or self.name

    def teacher_keys(self, cfg: ExperimentConfig) -> list[int | str]:
        """The teachers this setting distils from: subset teacher indices (ints) or the
        architectures of full-split teachers (strs)."""
        if self.teachers == "single":  # validate.check_options: it is among the architectures
            return [cfg.teachers.architectures.index(cfg.teachers.single_teacher)]
        if self.teachers == "all":
            return list(range(len(cfg.teachers.architectures)))
        if self.teachers == "single_full":
            return [cfg.teachers.single_teacher]
        if self.teachers == "all_full":
            return list(dict.fromkeys(cfg.teachers.architectures))
        return []

    def kd_weights(self, cfg: ExperimentConfig) -> tuple[str, bool]:
        """(normalize, per_example) of the KD step's teacher weights under `cfg`."""
        if self.normalize is not None:
            return self.normalize, False
        if self.weight_options:
            return cfg.distill.normalize, cfg.distill.per_example
        return "sum1", False

    def same_run_as(self, cfg: ExperimentConfig) -> str | None:
        """The setting whose training run this one would repeat under `cfg` (a fixed-normalisation
        variant of RoS-KD when --distill.normalize already is its normalisation), else None."""
        method = REGISTRY[METHOD]
        if self.normalize is None or self.kd_weights(cfg) != method.kd_weights(cfg):
            return None
        return METHOD


def _ros_kd_variant(normalize: str, what: str) -> Setting:
    """RoS-KD (M_smooth) with the exponential weights normalised by `normalize`, whatever --distill.normalize."""
    return Setting(name=f"ros_kd_{normalize}", title=f"RoS-KD (M_smooth), {what}", teachers="all",
                   weighting="exponential", normalize=normalize, smoothing=True, model="smooth", smoke=False)


SETTINGS: tuple[Setting, ...] = (
    Setting(name="baseline_i", title="Baseline I (CE only)", teachers="none"),
    Setting(name="baseline_ii", title="Baseline II (Hinton KD, one teacher on the full training split)",
            teachers="single_full"),
    Setting(name="baseline_ii_subset", title="Baseline II, one subset teacher (Hinton KD)", teachers="single"),
    Setting(name="baseline_iii", title="Baseline III (equal-weight teachers)", teachers="all", compared=True),
    Setting(name="baseline_iii_full", title="Baseline III, traditional (equal-weight teachers on the full "
            "training split)", teachers="all_full", smoke=False),
    Setting(name="baseline_iv", title="Baseline IV (RL teacher selection)", teachers="all", trainer="rl"),
    Setting(name="baseline_v", title="Baseline V (RoS-KD, no smoothing)", teachers="all", weighting="exponential",
            weight_options=True, trained_by="ros_kd"),
    Setting(name="ros_kd", title="RoS-KD (M_smooth)", teachers="all", weighting="exponential", weight_options=True,
            smoothing=True, model="smooth", compared=True, folds=True),
    _ros_kd_variant("none", "unnormalised Exp(1) weights (the paper's formula)"),
    _ros_kd_variant("sumk", "Exp(1) weights rescaled to sum K"),
    _ros_kd_variant("sum1", "Exp(1) weights rescaled to sum 1 (Dirichlet)"),
)
REGISTRY: dict[str, Setting] = {s.name: s for s in SETTINGS}
# Names users type that mean a registered setting; version 0.1 called RoS-KD "rosjax".
ALIASES = {"rosjax": "ros_kd"}

TRAINED = tuple(s.name for s in SETTINGS if s.trained_by is None)  # settings with a training run
COMPARED = tuple(s.name for s in SETTINGS if s.compared)
FOLDS = tuple(s.name for s in SETTINGS if s.folds)
WEIGHT_OPTIONS = tuple(s.name for s in SETTINGS if s.weight_options and s.trained_by is None)
METHOD = "ros_kd"  # the method itself: the reference of the report's cost ratios


def requested(cfg: ExperimentConfig) -> list[str]:
    """The settings `--settings` asks for (canonical names); empty means every trained setting
    but those repeating another's run (`Setting.same_run_as`) and, in a smoke run, those marked
    `smoke=False`."""
    return [canonical(s) for s in cfg.settings] or [
        s.name for s in SETTINGS if s.trained_by is None and s.same_run_as(cfg) is None and (s.smoke or not cfg.smoke)]


def full_teachers(cfg: ExperimentConfig, settings) -> list[str]:
    """Architectures of the full-split teachers the settings `settings` distil from, in first-use order."""
    return list(dict.fromkeys(k for s in settings for k in get(s).teacher_keys(cfg) if isinstance(k, str)))


def canonical(name: str) -> str:
    """The registered name for `name` (an alias is translated, with a note in the log)."""
    if name in ALIASES:
        log.info("setting %r is called %r now; using %r", name, ALIASES[name], ALIASES[name])
        return ALIASES[name]
    return name


def get(name: str) -> Setting:
    """The registry entry of a (canonical) setting name; KeyError names the valid ones."""
    if name not in REGISTRY:
        raise KeyError(f"unknown setting {name!r}; valid: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def evaluated(trained: list[str] | tuple[str, ...]) -> list[str]:
    """The settings scored after training `trained`, in Table I order (RoS-KD brings baseline V)."""
    return [s.name for s in SETTINGS if s.folder in trained]
