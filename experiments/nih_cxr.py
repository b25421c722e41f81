"""NIH ChestX-ray14 cardiopulmonary disease classification (8 labels, multi-label) with RoS-KD.

    python -m experiments.nih_cxr --smoke
    python -m experiments.nih_cxr --data.manual_dir=/data/nih --workdir work/nih_cxr
    python -m experiments.nih_cxr --stage folds           # Table III: three split seeds

The label table (Data_Entry_2017*.csv) has no stable public link: put it (and, if you have
them, the images_0NN.tar.gz archives) in --data.manual_dir; the command says exactly what
is missing. Paper values as in experiments/lesion.py; multi-label outputs use per-label
sigmoid KD. Expected (paper): RoS-KD F1 0.349, mean AUROC 0.838 (Table III).
"""
from __future__ import annotations

import sys

from experiments import lesion
from rosjax import config as C
from rosjax.experiment import cli

CHESTXRAY8_LABELS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
                     "Pneumonia", "Pneumothorax")


def get_config(smoke: bool = False) -> C.ExperimentConfig:
    """The paper's cardiopulmonary experiment; `smoke=True` shrinks it to run on a CPU in minutes."""
    cfg = C.ExperimentConfig(
        name="nih_cxr",
        data=C.DataConfig(
            dataset="nih_chestxray14",
            image_size=224,
            labels=CHESTXRAY8_LABELS,  # The 8 ChestX-ray8 labels of the paper.
            augment="chest_xray",      # No vertical flip, no colour jitter; mild rotation.
            pixel_mean=(0.5,),         # One grey channel.
            pixel_std=(0.25,),
        ),
    )
    return lesion.smoke_variant(cfg) if smoke else cfg


if __name__ == "__main__":
    sys.exit(cli.main(get_config))
