"""ISIC 2019 skin-lesion training set as a TFDS builder (`isic2019`), registered on import."""
from rosjax.data.isic2019.csv_files import CLASS_NAMES, IsicRecord, read_records
from rosjax.data.isic2019.isic2019_dataset_builder import (
    DEFAULT_IMAGE_SIZE,
    GROUND_TRUTH_CSV,
    IMAGE_SIZES,
    IMAGES_ZIP,
    METADATA_CSV,
    Builder,
)
