"""TFDS builder `isic2019`: the 25,331 ISIC 2019 training images, resized, with metadata.

Inputs, from the manual directory when present there, else downloaded from the ISIC S3
host (the legacy host is the fallback):
  ISIC_2019_Training_Input.zip (or its JPEGs extracted in any layout: nested, the Kaggle
  mirror's double nesting, or flat), ISIC_2019_Training_GroundTruth.csv,
  ISIC_2019_Training_Metadata.csv.
One split, 'train', holds every image; grouped train/val/test splits are made at load time
(rosjax.data.splits) from the stored lesion ids. Configs '32' ... '256' (default '256')
store square JPEGs of that size.
"""
from __future__ import annotations

import os
import pathlib
import zipfile
import zlib

import numpy as np
import tensorflow_datasets as tfds

from rosjax.data import builder_utils, downloads, input_files, resizing
from rosjax.data.errors import DataError
from rosjax.data.isic2019.csv_files import CLASS_NAMES, IsicRecord, read_records

IMAGES_ZIP = "ISIC_2019_Training_Input.zip"
GROUND_TRUTH_CSV = "ISIC_2019_Training_GroundTruth.csv"
METADATA_CSV = "ISIC_2019_Training_Metadata.csv"
# The current challenge host first, the legacy host (FLamby and older scripts) second.
HOSTS = ("https://isic-archive.s3.amazonaws.com/challenges/2019/",
         "https://isic-challenge-data.s3.amazonaws.com/2019/")
IMAGE_SIZES = (32, 64, 96, 128, 224, 256)
DEFAULT_IMAGE_SIZE = 256

_CITATION = r"""
@article{tschandl2018ham10000,
  title={The {HAM10000} dataset, a large collection of multi-source dermatoscopic images of
         common pigmented skin lesions},
  author={Tschandl, Philipp and Rosendahl, Cliff and Kittler, Harald},
  journal={Scientific Data}, volume={5}, pages={180161}, year={2018}}
@article{codella2017skin,
  title={Skin Lesion Analysis Toward Melanoma Detection: A Challenge at the 2017 International
         Symposium on Biomedical Imaging ({ISBI}), Hosted by the International Skin Imaging
         Collaboration ({ISIC})},
  author={Codella, Noel and others}, journal={arXiv:1710.05006}, year={2017}}
@article{combalia2019bcn20000,
  title={{BCN20000}: Dermoscopic Lesions in the Wild},
  author={Combalia, Marc and others}, journal={arXiv:1908.02288}, year={2019}}
"""


class Builder(builder_utils.ResizedImageBuilder):
    """ISIC 2019 training set: 8 classes, lesion ids for grouped splits, age/sex/site."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: resized JPEGs, lesion ids, age/sex/site."}
    BUILDER_CONFIGS = builder_utils.square_configs(IMAGE_SIZES, "ISIC 2019 training set.")
    DEFAULT_BUILDER_CONFIG_NAME = str(DEFAULT_IMAGE_SIZE)
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Optional: with internet the files are downloaded automatically. Offline, put these
    files from https://challenge.isic-archive.com/data/#2019 in the manual directory
    (default <data_dir>/downloads/manual/, or the manual_dir you pass):
      {IMAGES_ZIP}   (or the JPEGs extracted from it, in any sub-folder)
      {GROUND_TRUTH_CSV}
      {METADATA_CSV}
    """

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description="ISIC 2019 challenge training set (dermoscopy, 8 classes).",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(s, s, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                "image_id": tfds.features.Text(),
                "lesion_id": tfds.features.Text(),  # the image id where there is none
                "age": tfds.features.Scalar(dtype=np.int32),  # -1 = unknown
                "sex": tfds.features.Text(),  # '' = unknown
                "site": tfds.features.Text(),  # anatom_site_general; '' = unknown
            }),
            supervised_keys=("image", "label"),
            homepage="https://challenge.isic-archive.com/data/#2019",
            citation=_CITATION,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        root = self.manual_root
        found = input_files.index_files(root, (".jpg", ".jpeg", ".csv", ".zip"))
        if not self._allow_download:
            missing = [n for n in (IMAGES_ZIP, GROUND_TRUTH_CSV, METADATA_CSV) if n not in found]
            if IMAGES_ZIP in missing and any(n.lower().endswith((".jpg", ".jpeg"))
                                             for n in found):
                missing.remove(IMAGES_ZIP)  # extracted images (checked against the CSV below)
            if missing:
                raise self.missing_inputs_error(missing)
        records = read_records(self._input(found, GROUND_TRUTH_CSV, dl_manager),
                               self._input(found, METADATA_CSV, dl_manager))
        loose = {os.path.splitext(name)[0]: paths[0] for name, paths in found.items()
                 if name.lower().endswith((".jpg", ".jpeg"))}
        missing = [r.image_id for r in records if r.image_id not in loose]
        if not missing:
            return {"train": self._generate_examples(records, loose=loose, zip_path=None)}
        if len(missing) < len(records) and IMAGES_ZIP not in found:
            raise DataError(
                f"{len(missing)} of the {len(records)} images listed in {GROUND_TRUTH_CSV} "
                f"are missing under {root}, e.g. {[m + '.jpg' for m in missing[:5]]}. Put "
                f"the complete extracted folder or {IMAGES_ZIP} there.")
        zip_path = self._input(found, IMAGES_ZIP, dl_manager)
        return {"train": self._generate_examples(records, loose=None, zip_path=zip_path)}

    def _input(self, found, filename: str, dl_manager) -> pathlib.Path:
        """The manual directory's copy of `filename` (shallowest), else a download."""
        if filename in found:
            return found[filename][0]
        if not self._allow_download:
            raise self.missing_inputs_error([filename])
        return downloads.download_first(
            dl_manager, filename, [host + filename for host in HOSTS],
            hint=f"Offline, put {filename} in the manual directory {self.manual_root} "
                 "(any sub-folder works).")

    def _generate_examples(self, records: list[IsicRecord], *, loose, zip_path):
        by_id = {r.image_id: r for r in records}
        seen: set[str] = set()

        def from_files():
            for r in records:
                path = loose[r.image_id]
                yield r, path.read_bytes(), str(path)

        def from_zip():
            try:
                zf = zipfile.ZipFile(zip_path)
            except (zipfile.BadZipFile, OSError) as e:
                raise DataError(f"{zip_path} is not a readable zip file ({e}); delete it and "
                                "download it again.") from e
            with zf:
                for info in zf.infolist():
                    base = info.filename.rsplit("/", 1)[-1]
                    stem, ext = os.path.splitext(base)
                    if (info.is_dir() or base.startswith(".") or "__MACOSX" in info.filename
                            or ext.lower() not in (".jpg", ".jpeg") or stem not in by_id):
                        continue
                    if stem in seen:
                        raise DataError(f"{zip_path}: image {stem} appears twice "
                                        f"(again as {info.filename}).")
                    seen.add(stem)
                    name = f"{zip_path}:{info.filename}"
                    try:
                        data = input_files.read_zip_member(zf, info, zip_path)
                    except (zipfile.BadZipFile, zlib.error, OSError) as e:
                        raise DataError(f"{name} cannot be read from the zip ({e}); the zip is "
                                        "damaged, delete it and download it again.") from e
                    yield by_id[stem], data, name

        def resize(item):
            record, data, name = item
            return record, self._resize_or_skip(data, name, "RGB")

        for r, jpeg in resizing.ordered_map(resize, from_files() if zip_path is None
                                                 else from_zip()):
            if jpeg is None:
                continue
            yield r.image_id, {"image": jpeg, "label": r.label, "image_id": r.image_id,
                               "lesion_id": r.lesion_id, "age": r.age, "sex": r.sex,
                               "site": r.site}
        if zip_path is not None:
            missing = [i for i in by_id if i not in seen]
            if missing:
                raise DataError(f"{len(missing)} images listed in {GROUND_TRUTH_CSV} are not "
                                f"in {zip_path}, e.g. {[m + '.jpg' for m in missing[:5]]}.")
