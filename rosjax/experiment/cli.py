"""Command line shared by `python -m experiments.lesion` and `python -m experiments.nih_cxr`.

    python -m experiments.lesion [--smoke] [--workdir DIR] [--stage STAGES] [--teacher I]
                                 [--verbose] [--debug] [--<field>=VALUE] [--<section>.<field>=VALUE ...]

`--stage` takes a comma-separated list of stages (default `all`):
  data        prepare the dataset, the split and the teacher subsets
  teachers    train the teachers (`--teacher I` trains teacher I alone, for one job per teacher)
  settings    train every student setting of `--settings` (default all; or name them: baseline_i, ...)
  evaluate    test metrics, attacks (Table II) and loss landscapes (Figure 4)
  sweeps      overlap-ratio, student-architecture and weight-normalisation sweeps (Figures 2–3)
  folds       NIH: three split seeds, per-class AUROC mean ± std (Table III)
  report      write report.json and report.md
Every stage skips work whose output is complete, so rerunning a command resumes it.
`--seeds=0,1,2` runs teachers, settings and evaluate once per seed (rosjax.experiment.seeds);
the report shows mean ± std over the seeds and RoS-KD − baseline bootstrap intervals.

Every option is checked before anything is written; a user error (bad option, bad data,
missing files, a work directory of another configuration) prints one line naming the culprit
and exits with status 2 (`--debug` shows the traceback). The console gets one line per stage
and per epoch; `--verbose` adds the INFO records of JAX, Orbax and TFDS.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import traceback
from collections.abc import Callable

from rosjax import config as config_lib
from rosjax.errors import UserError
from rosjax.experiment import settings as settings_lib

STAGES = ("data", "teachers", "settings", "evaluate", "sweeps", "folds", "report")
SETTINGS = settings_lib.TRAINED  # the settings with a training run of their own


def _program_name(get_config: Callable) -> str:
    """`python -m experiments.lesion`, also when the module runs as `__main__`."""
    module = sys.modules.get(get_config.__module__)
    spec = getattr(module, "__spec__", None)
    name = spec.name if spec is not None else get_config.__module__
    return f"python -m {name}"


def _split_overrides(rest: list[str], parser: argparse.ArgumentParser) -> dict[str, str]:
    """`--field=VALUE`, `--field VALUE`, `--section.field=VALUE` tokens as {path: text}."""
    top_level = {f.name for f in dataclasses.fields(config_lib.ExperimentConfig)}
    overrides, i = {}, 0
    while i < len(rest):
        token = rest[i]
        name = token[2:].split("=", 1)[0]
        if not token.startswith("--") or ("." not in name and name not in top_level):
            parser.error(f"unrecognised argument {token!r}; config fields look like --seed=1 or --optim.epochs=5")
        if "=" in token:
            value = token.split("=", 1)[1]
        elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            value = rest[i + 1]
            i += 1
        else:
            parser.error(f"{token} needs a value")
        overrides[name] = value
        i += 1
    return overrides


def parse_args(argv: list[str], get_config: Callable[..., config_lib.ExperimentConfig]):
    """Returns (config, workdir, stages, settings, teacher, flags) from the command line.

    `flags` holds `verbose` and `debug`. Only the syntax is checked here; `check_options`
    checks the values.
    """
    parser = argparse.ArgumentParser(
        prog=_program_name(get_config),
        description=(get_config.__module__ and sys.modules[get_config.__module__].__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any config field can be set as --field=VALUE or --section.field=VALUE (see get_config()).")
    parser.add_argument("--smoke", action="store_true",
                        help="small run of the whole pipeline on the bundled sample files")
    parser.add_argument("--workdir", default=None, help="work directory (default: ./work/<experiment>)")
    parser.add_argument("--stage", default="all",
                        help=f"comma-separated stages among {', '.join(STAGES)}, setting names, or 'all'")
    parser.add_argument("--teacher", type=int, default=None,
                        help="train only teacher I (0-based) and stop; for one cluster job per teacher")
    parser.add_argument("--verbose", action="store_true", help="also show JAX, Orbax and TFDS INFO records")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    args, rest = parser.parse_known_args(argv)
    overrides = _split_overrides(rest, parser)

    cfg = get_config(smoke=args.smoke)
    try:
        cfg = config_lib.apply_overrides(cfg, overrides)
    except ValueError as err:
        parser.error(str(err))
    cfg = dataclasses.replace(cfg, settings=tuple(settings_lib.canonical(s) for s in cfg.settings))

    requested = [settings_lib.canonical(s.strip()) for s in args.stage.split(",") if s.strip()]
    unknown = [s for s in requested if s not in (*STAGES, *SETTINGS, "all")]
    if unknown:
        parser.error(f"--stage: unknown {', '.join(unknown)}; valid: all, {', '.join(STAGES + SETTINGS)}")
    if "all" in requested:
        stages = [s for s in STAGES if s != "folds" or cfg.data.dataset == "nih_chestxray14"]
        settings = settings_lib.requested(cfg)
    else:
        settings = [s for s in requested if s in SETTINGS]
        stages = [s for s in STAGES if s in requested or (s == "settings" and settings)]
        settings = settings or settings_lib.requested(cfg)
    if args.teacher is not None:
        if not 0 <= args.teacher < len(cfg.teachers.architectures):
            parser.error(f"--teacher {args.teacher}: the config has "
                         f"{len(cfg.teachers.architectures)} teachers (0..{len(cfg.teachers.architectures) - 1})")
        stages = ["data", "teachers"]
    workdir = args.workdir or f"work/{cfg.name}{'-smoke' if cfg.smoke else ''}"
    return cfg, workdir, stages, settings, args.teacher, {"verbose": args.verbose, "debug": args.debug}


def enable_compilation_cache() -> None:
    """Keeps compiled XLA programs on disk, so a rerun or a resumed run skips recompiling.

    Location: $ROSJAX_COMPILATION_CACHE, default ~/.cache/rosjax/xla (set it to an empty
    string to turn the cache off).
    """
    import jax  # noqa: PLC0415

    location = os.environ.get("ROSJAX_COMPILATION_CACHE", os.path.expanduser("~/.cache/rosjax/xla"))
    if location:
        jax.config.update("jax_compilation_cache_dir", location)
        # Every program, however quick to compile: a resumed run then starts without compiling.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


class _QuietLibraries(logging.Filter):
    """Passes rosjax's records, and other libraries' (JAX, Orbax/absl, TFDS) from WARNING up."""

    # TFDS warns about the empty folder of a dataset it is about to prepare: not the user's problem.
    # grain's hint about OpenCV likewise (PIL decodes the stored JPEGs).
    _NOISE = ("has no dataset_info.json", "OpenCV is not installed")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("rosjax"):
            return True
        return record.levelno >= logging.WARNING and not any(n in record.getMessage() for n in self._NOISE)


def configure_logging(verbose: bool) -> None:
    """The application's console: `HH:MM:SS message` on stderr; libraries quiet unless `verbose`.

    Only the CLI calls this: the library itself never configures the root logger.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    if not verbose:
        handler.addFilter(_QuietLibraries())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    for name in ("absl", "jax", "orbax"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose and not sys.stderr.isatty():
        import tensorflow_datasets as tfds  # noqa: PLC0415

        tfds.disable_progress_bar()  # bars only on a terminal


def main(get_config: Callable[..., config_lib.ExperimentConfig], argv: list[str] | None = None, *,
         run: Callable[..., object] | None = None) -> int:
    """Entry point of an experiment module; returns the process exit status.

    `run(cfg, workdir, stages=..., settings=..., teacher=...)` does the work: rosjax.experiment.runner.run
    by default, a study's own loop over runner runs otherwise (experiments.noise_study).
    2: a user error, printed as `error: ...` lines (with the traceback under `--debug`);
    130: interrupted (rerun the same command to resume).
    """
    argv = sys.argv[1:] if argv is None else argv
    if "--verbose" not in argv:
        # XLA's C++ log (e.g. its "Very slow compile?" alarm on a CPU) reads this when jaxlib is
        # loaded, which parse_args already does (the smoke config imports rosjax.data).
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    cfg, workdir, stages, settings, teacher, flags = parse_args(argv, get_config)
    configure_logging(flags["verbose"])
    try:
        if run is None:
            from rosjax.experiment import runner  # noqa: PLC0415 (keeps --help fast)
            run = runner.run
        enable_compilation_cache()
        run(cfg, workdir, stages=stages, settings=settings, teacher=teacher)
    except UserError as err:
        if flags["debug"]:
            traceback.print_exc()
        for line in str(err).splitlines() or [type(err).__name__]:
            print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: rerun the same command to resume from {workdir}", file=sys.stderr)
        return 130
    return 0
