"""Your own images + a CSV of labels as a TFDS builder (`csv_images`), registered on import."""
from rosjax.data.csv_images.csv_files import IMAGE_SUFFIXES, CsvRecord, CsvTable, find_csv, label_array, read_table
from rosjax.data.csv_images.csv_images_dataset_builder import (
    CHANNELS,
    DEFAULT_IMAGE_SIZE,
    IMAGE_SIZES,
    Builder,
    CsvImagesConfig,
    csv_config,
)
