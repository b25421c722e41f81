"""Command line shared by `python -m experiments.lesion` and `python -m experiments.nih_cxr`.

    python -m experiments.lesion [--smoke] [--workdir DIR] [--stage STAGES] [--teacher I]
                                 [--<section>.<field>=VALUE ...]

`--stage` takes a comma-separated list of stages (default `all`):
  data        prepare the dataset, the split and the teacher subsets
  teachers    train the teachers (`--teacher I` trains teacher I alone, for one job per teacher)
  settings    train every student setting of `config.settings` (or name them: baseline_i, ...)
  evaluate    test metrics, attacks (Table II) and loss landscapes (Figure 4)
  sweeps      overlap-ratio, student-architecture and weight-normalisation sweeps (Figures 2–3)
  folds       NIH: three split seeds, per-class AUROC mean ± std (Table III)
  report      write report.json and report.md
Every stage skips work whose output is complete, so rerunning a command resumes it.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from rosjax import config as config_lib

STAGES = ("data", "teachers", "settings", "evaluate", "sweeps", "folds", "report")
SETTINGS = ("baseline_i", "baseline_ii", "baseline_iii", "baseline_iv", "rosjax")


def parse_args(argv: list[str], get_config: Callable[..., config_lib.ExperimentConfig]):
    """Returns (config, workdir, stages, settings, teacher) from the command line."""
    parser = argparse.ArgumentParser(
        prog=f"python -m experiments.{get_config.__module__.rsplit('.', 1)[-1]}",
        description=(get_config.__module__ and sys.modules[get_config.__module__].__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any config field can be overridden as --section.field=VALUE (see get_config()).")
    parser.add_argument("--smoke", action="store_true",
                        help="small run of the whole pipeline on the bundled sample files")
    parser.add_argument("--workdir", default=None, help="work directory (default: ./work/<experiment>)")
    parser.add_argument("--stage", default="all",
                        help=f"comma-separated stages among {', '.join(STAGES)}, setting names, or 'all'")
    parser.add_argument("--teacher", type=int, default=None,
                        help="train only teacher I (0-based) and stop; for one cluster job per teacher")
    args, rest = parser.parse_known_args(argv)

    overrides = {}
    i = 0
    while i < len(rest):
        token = rest[i]
        if not token.startswith("--") or "." not in token:
            parser.error(f"unrecognised argument {token!r}; overrides look like --optim.epochs=5")
        if "=" in token:
            key, value = token[2:].split("=", 1)
        elif i + 1 < len(rest):
            key, value = token[2:], rest[i + 1]
            i += 1
        else:
            parser.error(f"{token} needs a value")
        overrides[key] = value
        i += 1

    cfg = get_config(smoke=args.smoke)
    try:
        cfg = config_lib.apply_overrides(cfg, overrides)
    except ValueError as err:
        parser.error(str(err))

    requested = [s.strip() for s in args.stage.split(",") if s.strip()]
    unknown = [s for s in requested if s not in (*STAGES, *SETTINGS, "all")]
    if unknown:
        parser.error(f"--stage: unknown {', '.join(unknown)}; valid: all, {', '.join(STAGES + SETTINGS)}")
    if "all" in requested:
        stages = [s for s in STAGES if s != "folds" or cfg.data.dataset == "nih_chestxray14"]
        settings = list(cfg.settings)
    else:
        settings = [s for s in requested if s in SETTINGS]
        stages = [s for s in STAGES if s in requested or (s == "settings" and settings)]
        settings = settings or list(cfg.settings)
    if args.teacher is not None:
        if not 0 <= args.teacher < len(cfg.teachers.architectures):
            parser.error(f"--teacher {args.teacher}: the config has "
                         f"{len(cfg.teachers.architectures)} teachers (0..{len(cfg.teachers.architectures) - 1})")
        stages = ["data", "teachers"]
    workdir = args.workdir or f"work/{cfg.name}{'-smoke' if cfg.smoke else ''}"
    return cfg, workdir, stages, settings, args.teacher


def enable_compilation_cache() -> None:
    """Keeps compiled XLA programs on disk, so a rerun or a resumed run skips recompiling.

    Location: $ROSJAX_COMPILATION_CACHE, default ~/.cache/rosjax/xla (set it to an empty
    string to turn the cache off).
    """
    import jax  # noqa: PLC0415

    location = os.environ.get("ROSJAX_COMPILATION_CACHE", os.path.expanduser("~/.cache/rosjax/xla"))
    if location:
        jax.config.update("jax_compilation_cache_dir", location)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(get_config: Callable[..., config_lib.ExperimentConfig], argv: list[str] | None = None) -> int:
    """Entry point of an experiment module; returns the process exit status."""
    from rosjax.data import DataError  # noqa: PLC0415 (keeps --help fast)
    from rosjax.experiment import runner  # noqa: PLC0415
    from rosjax.experiment.workdir import WorkdirConflictError  # noqa: PLC0415

    cfg, workdir, stages, settings, teacher = parse_args(sys.argv[1:] if argv is None else argv, get_config)
    enable_compilation_cache()
    try:
        runner.run(cfg, workdir, stages=stages, settings=settings, teacher=teacher)
    except (DataError, WorkdirConflictError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
