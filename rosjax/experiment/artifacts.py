"""Finished models on disk, and the one call a notebook needs to load any of them.

A finished model is a folder of variables (`rosjax.checkpoint.save_variables`) next to a
`model.json` that says how to rebuild its module. `load_setting(workdir, name)` returns
`(module, variables, info)` for a student setting or a teacher:

    from rosjax.experiment.artifacts import load_setting
    model, variables, info = load_setting("work/lesion", "ros_kd")       # M_smooth
    predict = jax.jit(lambda x: model.apply(variables, x, train=False))
"""
from __future__ import annotations

import pathlib
from typing import Any

import jax.numpy as jnp

from rosjax import checkpoint, models
from rosjax.config import ExperimentConfig
from rosjax.experiment import settings as settings_lib
from rosjax.experiment import workdir as workdir_lib

MODEL_JSON = "model.json"


def model_spec(cfg: ExperimentConfig, architecture: str, *, class_names, num_channels: int) -> dict[str, Any]:
    """What `build_model` needs to rebuild a module, as JSON."""
    return {"architecture": architecture, "num_classes": len(class_names), "class_names": list(class_names),
            "dtype": cfg.dtype, "width": cfg.model_width, "pixel_mean": list(cfg.data.pixel_mean),
            "pixel_std": list(cfg.data.pixel_std), "image_size": cfg.data.image_size,
            "num_channels": num_channels}


def build_model(spec: dict[str, Any]):
    """The linen module described by a `model_spec` dict."""
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if spec["dtype"] not in dtypes:
        raise ValueError(f"dtype {spec['dtype']!r}: expected one of {', '.join(dtypes)}")
    return models.create(spec["architecture"], spec["num_classes"], dtype=dtypes[spec["dtype"]],
                         pixel_mean=tuple(spec["pixel_mean"]), pixel_std=tuple(spec["pixel_std"]),
                         width=spec.get("width", 1.0))  # model.json files of 0.1 have no width


def write_spec(folder: pathlib.Path, spec: dict[str, Any]) -> None:
    workdir_lib.write_json(folder / MODEL_JSON, spec)


def model_folder(workdir: str | pathlib.Path, name: str) -> tuple[pathlib.Path, pathlib.Path]:
    """(spec folder, variables folder) of a setting name, `teacher:<i>` or `teacher:full_<arch>`."""
    root = pathlib.Path(workdir).expanduser()
    if name.startswith("teacher:full_"):  # a full-split teacher (`training.teacher_folder`)
        folder = root / "teachers" / name.split(":", 1)[1]
        return folder, folder / "final"
    if name.startswith("teacher:"):
        index = int(name.split(":", 1)[1])
        matches = sorted((root / "teachers").glob(f"{index}-*"))
        if not matches:
            raise FileNotFoundError(f"no teacher {index} under {root / 'teachers'}")
        return matches[0], matches[0] / "final"
    name = settings_lib.canonical(name)
    if name not in settings_lib.REGISTRY:
        raise ValueError(f"unknown setting {name!r}; valid: {', '.join(settings_lib.REGISTRY)}, teacher:<i>")
    setting = settings_lib.get(name)  # baseline V is the raw student of RoS-KD's run, RoS-KD its M_smooth
    return root / "settings" / setting.folder, root / "settings" / setting.folder / "final" / setting.model


def load_setting(workdir: str | pathlib.Path, name: str, sharding=None):
    """Loads a finished model: returns (module, variables, spec dict).

    `name` is a setting of `rosjax.experiment.settings` (baseline_i … baseline_v, ros_kd) or `teacher:<i>`.
    """
    spec_dir, variables_dir = model_folder(workdir, name)
    if not (spec_dir / MODEL_JSON).exists() or not variables_dir.exists():
        raise FileNotFoundError(f"{name!r} has not finished training in {workdir} "
                                f"(missing {spec_dir / MODEL_JSON} or {variables_dir})")
    spec = workdir_lib.read_json(spec_dir / MODEL_JSON)
    return build_model(spec), checkpoint.load_variables(variables_dir, sharding), spec
