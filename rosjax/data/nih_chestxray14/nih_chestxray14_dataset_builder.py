"""TFDS builder `nih_chestxray14`: NIH ChestX-ray14, 112,120 frontal chest X-rays, resized.

Inputs (all found anywhere under the manual directory):
- the label table `Data_Entry_2017_v2020.csv` or `Data_Entry_2017.csv` (required: NIH
  publishes it without a stable direct link, so it cannot be downloaded automatically);
- optionally `train_val_list.txt` / `test_list.txt`, the official patient-wise test split;
- the images: `images_001.tar.gz` ... `images_012.tar.gz` (also the batch script's
  `images_01.tar.gz` naming, or `.zip` mirrors), or their extracted PNGs (`images/`,
  Kaggle's `images_0NN/images/`); when there are none, the 12 archives are downloaded
  from NIH's Box links and checked against their MD5s.
One split, 'train', holds every image; each example stores a grayscale JPEG, the 14
findings as a multi-hot vector (LABEL_NAMES order; the first 8 are the ChestX-ray8 task),
patient id, follow-up number, view position, age, sex and official-test membership.
"""
from __future__ import annotations

import bisect
import dataclasses
import hashlib
import os
import pathlib
import re
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds

from rosjax.data import builder_utils, downloads, input_files, resizing
from rosjax.data.errors import DataError
from rosjax.data.nih_chestxray14.csv_files import (
    LABEL_CSV_NAMES,
    LABEL_NAMES,
    TEST_LIST,
    TRAIN_VAL_LIST,
    NihRecord,
    multi_hot,
    read_image_list,
    read_label_csv,
)

IMAGE_SIZES = (32, 64, 96, 128, 224, 256, 512)  # 512: about four times the 256-px size on disk
DEFAULT_IMAGE_SIZE = 256
BOX_FOLDER = "https://nihcc.app.box.com/v/ChestXray-NIHCC"


@dataclasses.dataclass(frozen=True)
class Archive:
    """One of the 12 NIH image archives: its Box link, MD5 and first image (sorted names)."""

    name: str
    url: str
    md5: str
    first_image: str


ARCHIVES = tuple(Archive(f"images_{i:03d}.tar.gz", f"https://nihcc.box.com/shared/static/{h}.gz",
                         md5, first) for i, (h, md5, first) in enumerate((
    ("vfk49d74nhbxq3nqjg0900w5nvkorp5c", "fe8ed0a6961412fddcbb3603c11b3698", "00000001_000.png"),
    ("i28rlmbvmfjbl8p2n3ril0pptcmcu9d1", "ab07a2d7cbe6f65ddd97b4ed7bde10bf", "00001336_000.png"),
    ("f1t00wrtdk94satdfb9olcolqx20z2jp", "2301d03bde4c246388bad3876965d574", "00003923_014.png"),
    ("0aowwzs5lhjrceb3qp67ahp0rd1l1etg", "9f1b7f5aae01b13f4bc8e2c44a4b8ef6", "00006585_007.png"),
    ("v5e3goj22zr6h8tzualxfsqlqaygfbsn", "1861f3cd0ef7734df8104f2b0309023b", "00009232_004.png"),
    ("asi7ikud9jwnkrnkj99jnpfkjdes7l6l", "456b53a8b351afd92a35bc41444c58c8", "00011558_008.png"),
    ("jn1b4mw4n6lnh74ovmcjb8y48h8xj07n", "1075121ea20a137b87f290d6a4a5965e", "00013774_026.png"),
    ("tvpxmn7qyrgl0w8wfh9kqfjskv6nmm1j", "b61f34cec3aa69f295fbb593cbd9d443", "00016051_010.png"),
    ("upyy3ml7qdumlgk2rfcvlb9k6gvqq2pj", "442a3caa61ae9b64e61c561294d1e183", "00018387_035.png"),
    ("l6nilvfa9cg3s28tqv1qc1olm3gnz54p", "09ec81c4c31e32858ad8cf965c494b74", "00020945_050.png"),
    ("hhq8fkdgvcari67vfhs7ppg2w6ni4jze", "499aefc67207a5a97692424cf5dbeed5", "00024718_000.png"),
    ("ioqwiy20ihqwyr8pf4c24eazhh281pbu", "dc9fda1757c2de0032b63347a7d2895c", "00028173_003.png"),
), start=1))
# images_001.tar.gz (Box, Kaggle), images_01.tar.gz (NIH's batch_download_zips.py), .zip mirrors.
_ARCHIVE_NAME = re.compile(r"^images_(\d{2,3})\.(tar\.gz|tgz|zip)$")

_CITATION = r"""
@inproceedings{wang2017chestxray8,
  title={{ChestX-ray8}: Hospital-scale Chest X-ray Database and Benchmarks on
         Weakly-Supervised Classification and Localization of Common Thorax Diseases},
  author={Wang, Xiaosong and Peng, Yifan and Lu, Le and Lu, Zhiyong and Bagheri, Mohammadhadi
          and Summers, Ronald M.},
  booktitle={CVPR}, pages={2097--2106}, year={2017}}
"""


def archive_of(image: str) -> str:
    """The NIH archive that holds `image` (archives hold consecutive runs of sorted names)."""
    firsts = [a.first_image for a in ARCHIVES]
    return ARCHIVES[max(bisect.bisect_right(firsts, image) - 1, 0)].name


def _archive_members(path: pathlib.Path, wanted: Callable[[str], bool]
                     ) -> Iterator[tuple[str, bytes]]:
    """Yields (member path, bytes) of the archive's files whose base name is `wanted`.

    Tar archives are streamed (no index, no extraction to disk); zip archives are read by
    member. A damaged archive is a DataError naming it, and so is a wanted member above
    input_files.MAX_MEMBER_BYTES (refused by its size in the header, before reading it).
    """
    try:
        if path.name.lower().endswith(".zip"):
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    if not info.is_dir() and wanted(info.filename.rsplit("/", 1)[-1]):
                        yield info.filename, input_files.read_zip_member(zf, info, path)
        else:
            with tarfile.open(path, mode="r|*") as tar:
                for member in tar:
                    if member.isfile() and wanted(member.name.rsplit("/", 1)[-1]):
                        input_files.check_member_size(path, member.name, member.size)
                        yield member.name, tar.extractfile(member).read()
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise DataError(f"{path} is damaged or incomplete ({type(e).__name__}: {e}); delete "
                        "it and download it again.") from e


def _md5(path: pathlib.Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


class Builder(builder_utils.ResizedImageBuilder):
    """NIH ChestX-ray14: 14 findings (multi-hot), patient ids for grouped splits, metadata."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: resized grayscale JPEGs, 14-long multi-hot."}
    BUILDER_CONFIGS = builder_utils.square_configs(IMAGE_SIZES, "NIH ChestX-ray14.")
    DEFAULT_BUILDER_CONFIG_NAME = str(DEFAULT_IMAGE_SIZE)
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    From the NIH Box folder {BOX_FOLDER}, put in the manual directory (default
    <data_dir>/downloads/manual/, or the manual_dir you pass):
      {LABEL_CSV_NAMES[0]}   (required; or the original {LABEL_CSV_NAMES[1]}, e.g. Kaggle's)
      {TRAIN_VAL_LIST}, {TEST_LIST}   (optional: the official test split)
      images_001.tar.gz ... images_012.tar.gz   (optional: downloaded automatically when
          absent; an extracted images/ folder works too)
    """

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description="NIH ChestX-ray14: 112,120 frontal chest X-rays of 30,805 patients, "
                        "14 text-mined findings.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(s, s, 1), encoding_format="jpeg"),
                "labels": tfds.features.Tensor(shape=(len(LABEL_NAMES),), dtype=np.uint8),
                "image_id": tfds.features.Text(),
                "patient_id": tfds.features.Text(),
                "follow_up": tfds.features.Scalar(dtype=np.int32),
                "view_position": tfds.features.Text(),
                "age": tfds.features.Scalar(dtype=np.int32),
                "sex": tfds.features.Text(),
                "official_test": tfds.features.Scalar(dtype=np.bool_),  # False without lists
            }),
            supervised_keys=("image", "labels"),
            homepage=BOX_FOLDER,
            citation=_CITATION,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        found = input_files.index_files(
            self.manual_root, (".png", ".csv", ".txt", ".gz", ".tgz", ".zip"))
        csv_path = next((found[n][0] for n in LABEL_CSV_NAMES if n in found), None)
        if csv_path is None:
            raise DataError(self._missing_csv_message())
        records = read_label_csv(csv_path)
        official_test = self._official_test(found, records)
        loose = {name: paths[0] for name, paths in found.items() if name.endswith(".png")}
        archives = sorted((paths[0] for name, paths in found.items()
                           if _ARCHIVE_NAME.match(name)), key=lambda p: p.name)
        if not archives and not any(r.image_id in loose for r in records):
            if not self._allow_download:
                raise self.missing_inputs_error(
                    [a.name for a in ARCHIVES],
                    note=f"(or their extracted PNGs, e.g. images/{records[0].image_id}; "
                         f"from {BOX_FOLDER})")
            archives = self._download_archives(dl_manager)
        self.info.metadata["label_csv"] = csv_path.name
        self.info.metadata["official_lists"] = official_test is not None
        return {"train": self._generate_examples(records, official_test, loose, archives,
                                                 csv_path)}

    def _missing_csv_message(self) -> str:
        root = self.manual_root
        return (
            f"nih_chestxray14: the label table is missing from the manual directory {root}. "
            "NIH publishes it without a stable direct link, so it cannot be downloaded "
            f"automatically. From {BOX_FOLDER} put:\n"
            f"  {root / LABEL_CSV_NAMES[0]}   (required; the original {LABEL_CSV_NAMES[1]} "
            "works too)\n"
            f"  {root / TRAIN_VAL_LIST} and {root / TEST_LIST}   (optional: the official "
            "test split)\n"
            f"  {root}/images_001.tar.gz ... images_012.tar.gz   (optional: downloaded "
            "automatically when absent; an extracted images/ folder works too)")

    def _official_test(self, found, records: list[NihRecord]) -> set[str] | None:
        """Names of the official test images, or None when neither list is present."""
        lists = {n: read_image_list(found[n][0]) for n in (TRAIN_VAL_LIST, TEST_LIST)
                 if n in found}
        if not lists:
            return None
        names = {r.image_id for r in records}
        if TEST_LIST not in lists:
            return names - lists[TRAIN_VAL_LIST]
        test = lists[TEST_LIST]
        if TRAIN_VAL_LIST in lists:
            both = sorted(lists[TRAIN_VAL_LIST] & test)
            neither = sorted(names - lists[TRAIN_VAL_LIST] - test)
            if both or neither:
                raise DataError(
                    f"{found[TRAIN_VAL_LIST][0]} and {found[TEST_LIST][0]} must list every "
                    "image once: "
                    + (f"{len(both)} are in both, e.g. {both[:5]}" if both else
                       f"{len(neither)} are in neither, e.g. {neither[:5]}"))
        return test & names

    def _download_archives(self, dl_manager) -> list[pathlib.Path]:
        hint = (f"Offline, put images_001.tar.gz ... images_012.tar.gz (or the extracted "
                f"images/ folder) from {BOX_FOLDER} in {self.manual_root}.")
        if (reason := downloads.unreachable(ARCHIVES[0].url)) is not None:
            raise DataError(f"Could not download the NIH image archives: {reason}. {hint}")
        try:
            with downloads.few_download_retries():
                paths = dl_manager.download({a.name: a.url for a in ARCHIVES})
        except Exception as e:  # noqa: BLE001 - any download failure gets the same advice
            raise DataError(f"Could not download the NIH image archives "
                            f"({type(e).__name__}: {e}). {hint}") from e
        out = []
        for a in ARCHIVES:
            path = pathlib.Path(os.fspath(paths[a.name]))
            if (md5 := _md5(path)) != a.md5:
                raise DataError(f"{path} (downloaded {a.name} from {a.url}) has MD5 {md5}, "
                                f"expected {a.md5}; delete it and try again. {hint}")
            out.append(path)
        return out

    def _generate_examples(self, records, official_test, loose, archives, csv_path):
        by_name = {r.image_id: r for r in records}
        done: set[str] = set()

        def wanted(name: str) -> bool:
            return name in by_name and name not in done

        def items():
            for name in sorted(n for n in loose if n in by_name):
                done.add(name)
                yield by_name[name], loose[name].read_bytes(), str(loose[name])
            for archive in archives:
                for member, data in _archive_members(archive, wanted):
                    name = member.rsplit("/", 1)[-1]
                    done.add(name)
                    yield by_name[name], data, f"{archive}:{member}"

        def resize(item):
            record, data, name = item
            return record, self._resize_or_skip(data, name, "L")

        for r, jpeg in resizing.ordered_map(resize, items()):
            if jpeg is None:
                continue
            yield r.image_id, {
                "image": jpeg, "labels": multi_hot(r.labels), "image_id": r.image_id,
                "patient_id": r.patient_id, "follow_up": r.follow_up,
                "view_position": r.view_position, "age": r.age, "sex": r.sex,
                "official_test": official_test is not None and r.image_id in official_test}
        missing = [n for n in by_name if n not in done]
        if missing:
            needed = sorted({archive_of(n) for n in missing})
            raise DataError(
                f"{len(missing)} images listed in {csv_path} were not found under "
                f"{self.manual_root}, e.g. {missing[:5]}. By NIH's numbering they are in "
                f"{', '.join(needed)}: put those archives (or their extracted PNGs) there.")
