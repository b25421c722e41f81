"""rosjax.data: the TFDS builders (registered on import: `isic2019`, `nih_chestxray14`, and
`csv_images` for a user's own images + CSV),
the loader API (`prepare`, `PreparedDataset`, `sample_dir`), grouped splits and overlapping
teacher subsets, label-noise injection, the grain input pipeline, and the input-data errors."""
from rosjax.data import csv_images, isic2019, nih_chestxray14
from rosjax.data.datasets import DATASETS, PreparedDataset, prepare, sample_dir
from rosjax.data.errors import CorruptImageError, DataError
from rosjax.data.noise import MODES, NoisyLabels, add_label_noise
from rosjax.data.pipeline import eval_batches, train_dataset, train_iterator
from rosjax.data.splits import (
                                fold_seeds,
                                grouped_split,
                                official_split,
                                overlapping_subsets,
                                shared_groups,
                                split_summary,
)
from rosjax.data.views import AugmentConfig

__all__ = ["AugmentConfig", "CorruptImageError", "DATASETS", "csv_images", "DataError", "MODES", "NoisyLabels",
           "PreparedDataset", "add_label_noise", "eval_batches", "fold_seeds", "grouped_split",
           "isic2019", "nih_chestxray14", "official_split", "overlapping_subsets", "prepare",
           "sample_dir", "shared_groups", "split_summary", "train_dataset",
           "train_iterator"]
