"""NIH ChestX-ray14 as a TFDS builder (`nih_chestxray14`), registered on import."""
from rosjax.data.nih_chestxray14.csv_files import (
    CHESTXRAY8_LABELS,
    LABEL_CSV_NAMES,
    LABEL_NAMES,
    NO_FINDING,
    TEST_LIST,
    TRAIN_VAL_LIST,
    NihRecord,
    multi_hot,
    read_image_list,
    read_label_csv,
)
from rosjax.data.nih_chestxray14.nih_chestxray14_dataset_builder import (
    ARCHIVES,
    DEFAULT_IMAGE_SIZE,
    IMAGE_SIZES,
    Archive,
    Builder,
    archive_of,
)
