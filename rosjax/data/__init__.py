"""rosjax.data: the two TFDS builders (registered on import: `isic2019`, `nih_chestxray14`),
the loader API (`prepare`, `PreparedDataset`, `sample_dir`) and the input-data errors."""
from rosjax.data import isic2019, nih_chestxray14
from rosjax.data.builder_utils import CorruptImageError, DataError
from rosjax.data.datasets import DATASETS, PreparedDataset, prepare, sample_dir

__all__ = ["CorruptImageError", "DATASETS", "DataError", "PreparedDataset", "isic2019",
           "nih_chestxray14", "prepare", "sample_dir"]
