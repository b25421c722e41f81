"""The registry of an experiment's settings: baselines I–V and RoS-KD, one entry each.

Every stage reads this table and nothing else about settings: the CLI (which names exist),
training (which teachers, which step, smoothing or not), the artifacts (where a setting's
final model lives), evaluation (what is scored, what the attacks and landscapes compare),
the sweeps and folds (which settings they rerun) and the report (titles and row order).
Adding a setting is one `Setting(...)` entry below plus its test.

A setting either trains (its own folder `WORKDIR/settings/<name>/`) or reads a model another
setting's run exports (`trained_by`): baseline V is the raw student of the RoS-KD run, whose
final model is M_smooth.
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
    teachers: str                # "none" (labels only), "single" (--teachers.single_teacher) or "all"
    trainer: str = "distill"     # "distill" (the KD step; plain CE without teachers) or "rl" (baseline IV)
    weighting: str = "equal"     # teacher weights of the KD step: "equal" (1/K) or "exponential" (random)
    weight_options: bool = False  # takes --distill.normalize and --distill.per_example (RoS-KD's draws)
    smoothing: bool = False      # also exports M_smooth, the running mean of the epoch weights
    model: str = "student"       # the exported model its numbers come from: "student" or "smooth"
    trained_by: str | None = None  # the setting whose run exports this one's model (None: its own)
    compared: bool = False       # in Table II, Figure 4 and the sweeps (baseline III against RoS-KD)
    folds: bool = False          # the setting NIH's split-seed runs (Table III) train

    @property
    def folder(self) -> str:
        """The folder under WORKDIR/settings/ that holds this setting's training run."""
        return self.trained_by or self.name

    def teacher_indices(self, cfg: ExperimentConfig) -> list[int]:
        """Which of the config's teachers this setting distils from."""
        if self.teachers == "none":
            return []
        if self.teachers == "single":  # validate.check_options: it is among the architectures
            return [cfg.teachers.architectures.index(cfg.teachers.single_teacher)]
        return list(range(len(cfg.teachers.architectures)))


SETTINGS: tuple[Setting, ...] = (
    Setting(name="baseline_i", title="Baseline I (CE only)", teachers="none"),
    Setting(name="baseline_ii", title="Baseline II (Hinton KD, one teacher)", teachers="single"),
    Setting(name="baseline_iii", title="Baseline III (equal-weight teachers)", teachers="all", compared=True),
    Setting(name="baseline_iv", title="Baseline IV (RL teacher selection)", teachers="all", trainer="rl"),
    Setting(name="baseline_v", title="Baseline V (RoS-KD, no smoothing)", teachers="all", weighting="exponential",
            weight_options=True, trained_by="ros_kd"),
    Setting(name="ros_kd", title="RoS-KD (M_smooth)", teachers="all", weighting="exponential", weight_options=True,
            smoothing=True, model="smooth", compared=True, folds=True),
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
    """The settings `--settings` asks for (canonical names); empty means every trained setting."""
    return [canonical(s) for s in cfg.settings] or list(TRAINED)


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
