"""The noisy-label study: test macro-F1 of each setting against the injected training-label noise rate.

    python -m experiments.noise_study --smoke                     # a CPU, minutes (tiny_cnn models)
    python -m experiments.noise_study --workdir work/noise_study  # 2,000 generated ISIC-layout images
    python -m experiments.noise_study --rates=0,0.4 --seeds=0,1,2,3 --settings=baseline_iii,ros_kd
    python -m experiments.noise_study --data.noise_validation=true  # validation labels as noisy as training
    python -m experiments.noise_study --data.manual_dir=~/isic --data.stored_size=256 --data.image_size=224

Study options (besides every experiment option, `--smoke`, `--workdir`, `--stage`, `--seeds`, `--settings`):
  --rates=R,R,...     injected noise rates (default 0,0.2,0.4): symmetric for a one-label dataset, flip
                      for a multi-label one (or --data.noise=pair|...)
  --dataset=NAME      isic2019 (default; the lesion experiment's recipe) or nih_chestxray14 (nih_cxr's)
  --per_class=N       generated data: images per class (default 250: 2,000 images; smoke 40)
  --difficulty=D      generated data: realistic variation in [0, 1] (default 0.5; rosjax.data.sample_variation)

Each rate r is one experiment work directory WORKDIR/noise_<r>/ run through rosjax.experiment.runner
with every seed of --seeds and the stages data, teachers, settings and evaluate (test metrics only:
no attacks, landscapes or sweeps), so a rerun skips what is finished. The study then writes
WORKDIR/noise_study.md (setting x rate: macro-F1 mean ± std over seeds, and RoS-KD minus each
baseline with its paired bootstrap interval), noise_study.json and noise_study.png (macro-F1
against the rate, the seeds' std as error bars).

Data: without --data.manual_dir, the sample generator (rosjax.data.make_samples.generated_sample_dir)
in the real dataset's layout, prepared into its own TFDS folder, at stored size 64 with 64-px crops
(smoke: 32). With --data.manual_dir, the real files; give then the lesion experiment's sizes as above.
--smoke: tiny_cnn teachers (3) and student, 320 generated images, 6 epochs, seeds 0,1, and the settings
baseline I, baseline III and RoS-KD (with baseline V): it checks the study's plumbing, not the paper.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import pathlib
import sys

from experiments import lesion, nih_cxr
from rosjax import config as C
from rosjax.experiment import cli
from rosjax.experiment import settings as settings_lib

log = logging.getLogger("rosjax.noise_study")

RATES = (0.0, 0.2, 0.4)
PER_CLASS, SMOKE_PER_CLASS = 250, 40
DIFFICULTY = 0.5
BASES = {"isic2019": lesion, "nih_chestxray14": nih_cxr}
RATE_STAGES = ("data", "teachers", "settings", "evaluate")
GENERATED_TFDS = "~/.cache/rosjax/tensorflow_datasets/generated"  # + the set's folder name


def get_config(smoke: bool = False, dataset: str = "isic2019") -> C.ExperimentConfig:
    """The study's base configuration (noise filled in per rate by `rate_config`)."""
    base = BASES[dataset].get_config(smoke=smoke)
    cfg = dataclasses.replace(base, name="noise_study", seeds=(0, 1, 2),
                              data=dataclasses.replace(base.data, manual_dir=None, stored_size=64,
                                                       image_size=32 if smoke else 64))
    if not smoke:
        return cfg
    tiny = ("tiny_cnn",) * 3
    return dataclasses.replace(
        cfg, seeds=(0, 1),
        # Baseline I (no teachers) and the settings RoS-KD is compared with in Table II.
        settings=tuple(s.name for s in settings_lib.SETTINGS
                       if s.trained_by is None and (s.compared or s.teachers == "none")),
        teachers=dataclasses.replace(cfg.teachers, architectures=tiny, single_teacher="tiny_cnn"),
        distill=dataclasses.replace(cfg.distill, student="tiny_cnn", warmup_epochs=2),
        optim=dataclasses.replace(cfg.optim, epochs=6, milestones=(4,), learning_rate=0.05))


def noise_mode(cfg: C.ExperimentConfig) -> str:
    """--data.noise if given, else symmetric (one-label) or flip (multi-label)."""
    if cfg.data.noise != "none":
        return cfg.data.noise
    return "flip" if cfg.data.dataset == "nih_chestxray14" else "symmetric"


def rate_config(cfg: C.ExperimentConfig, rate: float) -> C.ExperimentConfig:
    """One rate's experiment: `cfg` with `rate` of injected noise (rate 0 too, so that every rate's
    configuration differs in the rate alone)."""
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, noise=noise_mode(cfg), noise_rate=rate))


def with_data(cfg: C.ExperimentConfig, per_class: int, difficulty: float) -> tuple[C.ExperimentConfig, dict]:
    """`cfg` reading the real files (--data.manual_dir) or a generated set (written once, cached),
    and a description of the data for the report."""
    if cfg.data.manual_dir:
        return cfg, {"source": "files", "manual_dir": cfg.data.manual_dir}
    from rosjax.data import make_samples  # noqa: PLC0415

    folder = make_samples.generated_sample_dir(cfg.data.dataset, per_class, difficulty=difficulty)
    data = dataclasses.replace(cfg.data, manual_dir=str(folder), data_dir=f"{GENERATED_TFDS}/{folder.name}")
    return dataclasses.replace(cfg, data=data), {"source": "generated", "manual_dir": str(folder),
                                                 "per_class": per_class, "difficulty": difficulty}


def run_study(cfg: C.ExperimentConfig, workdir, *, stages, settings, teacher=None, rates=RATES,
              per_class=PER_CLASS, difficulty=DIFFICULTY) -> dict | None:
    """Runs every rate's experiment (the stages among RATE_STAGES), then writes the study's table,
    JSON and plot when 'report' is among `stages`; returns the study's results then."""
    from rosjax.experiment import noise_report, runner  # noqa: PLC0415 (keeps --help fast)
    from rosjax.experiment.noise_report import rate_folder  # noqa: PLC0415
    from rosjax.experiment.validate import ConfigError  # noqa: PLC0415

    if not rates or any(not 0 <= r <= 1 for r in rates) or len(set(rates)) < len(rates):
        raise ConfigError([f"--rates={','.join(f'{r:g}' for r in rates)}: distinct noise rates in [0, 1] expected"])
    if cfg.data.noise_rate:
        raise ConfigError([f"--data.noise_rate={cfg.data.noise_rate:g}: the study sets the rate; use --rates"])
    cfg, data_about = with_data(cfg, per_class, difficulty)
    root = pathlib.Path(workdir)
    per_rate = {rate: rate_config(cfg, rate) for rate in rates}
    for rate, rcfg in per_rate.items():  # every rate's options checked before any trains
        runner.check(rcfg, root / rate_folder(rate), stages=[s for s in stages if s in RATE_STAGES] or ["data"],
                     settings=settings)
    for rate, rcfg in per_rate.items():
        rate_stages = [s for s in stages if s in RATE_STAGES]
        if rate_stages:
            log.info("noise study: rate %g (%s) in %s", rate, rcfg.data.noise, root / rate_folder(rate))
            runner.run(rcfg, root / rate_folder(rate), stages=rate_stages, settings=settings, teacher=teacher,
                       analyses=False)
    if "report" not in stages:
        return None
    results = noise_report.collect(cfg, root, per_rate, settings, data_about)
    paths = noise_report.write(root, results)
    log.info("noise study: %s", ", ".join(map(str, paths)))
    return results


def parse_study_options(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The study's own options (module docstring); the rest goes to the experiment CLI."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--rates", type=lambda s: tuple(float(x) for x in s.split(",") if x.strip()),
                        default=RATES)
    parser.add_argument("--dataset", choices=tuple(BASES), default="isic2019")
    parser.add_argument("--per_class", type=int, default=None)
    parser.add_argument("--difficulty", type=float, default=DIFFICULTY)
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    options, rest = parse_study_options(sys.argv[1:] if argv is None else argv)
    smoke = "--smoke" in rest
    per_class = options.per_class or (SMOKE_PER_CLASS if smoke else PER_CLASS)

    def study_config(smoke: bool = False) -> C.ExperimentConfig:
        return get_config(smoke, options.dataset)

    run = functools.partial(run_study, rates=options.rates, per_class=per_class, difficulty=options.difficulty)
    return cli.main(study_config, rest, run=run)


if __name__ == "__main__":
    sys.exit(main())

