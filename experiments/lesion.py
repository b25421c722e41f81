"""ISIC 2019 skin-lesion classification (8 classes, one label per image) with RoS-KD.

    python -m experiments.lesion --smoke                  # whole pipeline on the bundled samples, CPU, minutes
    python -m experiments.lesion --workdir work/lesion    # the paper's setting (downloads ISIC 2019, ~9 GB)
    python -m experiments.lesion --teacher 2              # train teacher 2 alone (one cluster job per teacher)
    python -m experiments.lesion --stage report           # re-render report.md from finished stages

Paper values (Section IV-B): 5 teachers on 5 subsets with overlap 0.4; SGD momentum 0.9,
weight decay 2e-4, lr 0.1 ÷10 at epochs 25 and 40, 50 epochs, batch 64; τ = 0.5, α = 0.9;
M_smooth averaged once per epoch after a 10-epoch warm-up. Expected (paper, Table I): RoS-KD
F1 0.716 against 0.694 for equal-weight multi-teacher KD.
"""
from __future__ import annotations

import dataclasses
import sys

from rosjax import config as C
from rosjax.experiment import cli

# ImageNet statistics: dermoscopy images are natural RGB photographs, and these are the
# statistics torchvision-pretrained teachers expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def get_config(smoke: bool = False) -> C.ExperimentConfig:
    """The paper's lesion experiment; `smoke=True` shrinks it to run on a CPU in minutes."""
    cfg = C.ExperimentConfig(
        name="lesion",
        data=C.DataConfig(
            dataset="isic2019",
            image_size=224,            # Crops fed to the networks.
            augment="dermoscopy",      # Flips both ways, rotation, colour jitter.
            pixel_mean=IMAGENET_MEAN,
            pixel_std=IMAGENET_STD,
        ),
    )
    return smoke_variant(cfg) if smoke else cfg


def smoke_variant(cfg: C.ExperimentConfig) -> C.ExperimentConfig:
    """Bundled sample files, 32-px crops, a few epochs; every stage and setting still runs.

    A 2-core CPU spends a smoke run compiling XLA programs, one per architecture and step, so
    the smoke swaps the paper's DenseNet-121 (a third of all compile time: its train step alone
    takes 1.5 minutes) for `densenet21`, the same DenseNet code with two layers per dense block,
    and sweeps the student over ResNet-18 and `densenet21`, whose evaluation programs the
    teachers already compiled. The sweep's second student was ResNet-34, the slowest train step
    of the zoo on a CPU at 32 px (443 ms a batch of 16, against 12 ms for `densenet21`).
    """
    from rosjax.data.datasets import sample_dir  # noqa: PLC0415

    teachers = tuple("densenet21" if a == "densenet121" else a for a in cfg.teachers.architectures)
    single = "densenet21" if cfg.teachers.single_teacher == "densenet121" else cfg.teachers.single_teacher
    return dataclasses.replace(
        cfg,
        smoke=True,
        model_width=0.25,
        # csv_images has no bundled samples: the smoke run keeps the user's --data.manual_dir.
        data=dataclasses.replace(cfg.data,
                                 manual_dir=(cfg.data.manual_dir if cfg.data.dataset == "csv_images"
                                             else str(sample_dir(cfg.data.dataset))),
                                 data_dir="~/.cache/rosjax/tensorflow_datasets", stored_size=64,
                                 image_size=32, eval_batch_size=32),
        teachers=dataclasses.replace(cfg.teachers, architectures=teachers, single_teacher=single),
        optim=dataclasses.replace(cfg.optim, epochs=3, batch_size=16, learning_rate=0.05, milestones=(2,)),
        # Cached teacher outputs with one stored view per epoch replay exactly the online run's
        # batches and teacher logits (tests/test_experiment.py checks it), and the students'
        # programs then compile without five teacher networks inside: most of a CPU smoke run.
        distill=dataclasses.replace(cfg.distill, warmup_epochs=1, recalibration_batches=4, rl_equal_epochs=2,
                                    teacher_outputs="cached", cache_views=3, cache_batch_size=32),
        evaluation=dataclasses.replace(cfg.evaluation, pgd_steps=3, landscape_grid=5, landscape_examples=16,
                                       attack_examples=32),
        # One extra point per sweep (the main run is the other); folds: two split seeds. Overlap
        # 0.2, not 0: disjoint subsets of the ~77 sample training images hold 15 or 16 each,
        # fewer than a batch of 16.
        sweeps=dataclasses.replace(cfg.sweeps, overlaps=(0.2, cfg.teachers.overlap),
                                   students=("resnet18", "densenet21"), fold_student=cfg.distill.student,
                                   normalizations=("none", "sum1"), per_example_normalizations=(),
                                   fold_seeds=(0, 1)),
        # Epochs of 2-5 steps: an epoch-end checkpoint is as recent as a mid-epoch one would be,
        # and each save of a 100 MB state costs the 2-core machine about 0.3 s of CPU.
        checkpoint_every_steps=0,
        log_every_steps=2,
    )


if __name__ == "__main__":
    sys.exit(cli.main(get_config))
