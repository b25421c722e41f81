"""TFDS builder `csv_images`: your own images and a CSV of their labels, resized.

Inputs, under the manual directory (`--data.manual_dir`): the images, loose in any layout
or inside .zip / .tar / .tar.gz / .tgz archives, and the label table (`--data.csv`, see
csv_files.py for its columns). Files are matched to CSV rows by name, anywhere under the
manual directory, with or without extension in the CSV. An image listed in the CSV but not
found is a DataError naming the first ones and their CSV lines; images found but not listed
are left out and counted in one logged warning.

There are no fixed configs: `csv_config(...)` makes one per stored size, channel count and
label table, named '<size>_<hash>' where the hash covers the CSV's bytes and the column
options, so two tables (or two column choices) never share stored files in one data_dir.
One split, 'train', holds every image; the grouped splits are made at load time.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import pathlib
import tarfile
import zipfile
import zlib
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from rosjax.data import builder_utils, input_files, resizing
from rosjax.data.csv_images.csv_files import IMAGE_SUFFIXES, CsvRecord, CsvTable, find_csv, options_hash, read_table
from rosjax.data.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SIZES = (32, 64, 96, 128, 224, 256, 512)
DEFAULT_IMAGE_SIZE = 256
CHANNELS = (1, 3)
_ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")


@dataclasses.dataclass
class CsvImagesConfig(builder_utils.SquareImageConfig):
    """A stored size + channel count + label table (what changes the stored examples)."""

    csv_path: str = ""
    image_column: str = ""
    label_columns: tuple[str, ...] = ()
    label_separator: str = ""
    group_column: str = ""
    channels: int = 3
    class_names: tuple[str, ...] = ()
    multilabel: bool = False


def csv_config(*, csv: str, manual_dir, image_column: str, label_columns, label_separator: str = "",
               group_column: str = "", channels: int = 3,
               image_size: int = DEFAULT_IMAGE_SIZE) -> tuple[CsvImagesConfig, CsvTable]:
    """Reads and checks the label table; returns the builder config and the parsed table."""
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"csv_images has no image_size={image_size}; choose one of {IMAGE_SIZES}.")
    if channels not in CHANNELS:
        raise ValueError(f"csv_images: channels={channels}; expected 1 (greyscale) or 3 (RGB).")
    path = find_csv(csv, manual_dir)
    table = read_table(path, image_column=image_column, label_columns=tuple(label_columns),
                       label_separator=label_separator, group_column=group_column)
    digest = options_hash(path.read_bytes(), image_column=image_column,
                          label_columns=tuple(label_columns), label_separator=label_separator,
                          group_column=group_column, channels=channels)
    config = CsvImagesConfig(
        name=f"{image_size}_{digest}", image_size=image_size,
        description=f"{path.name}: {len(table.records)} images, classes {list(table.class_names)}, "
                    f"{channels} channel(s), resized to {image_size}x{image_size} px, JPEG.",
        csv_path=str(path), image_column=image_column, label_columns=tuple(label_columns),
        label_separator=label_separator, group_column=group_column, channels=channels,
        class_names=table.class_names, multilabel=table.multilabel)
    return config, table


def _stem(name: str) -> str:
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return name[:-len(suffix)]
    return name


def _is_archive(name: str) -> bool:
    return name.lower().endswith(_ARCHIVE_SUFFIXES)


class Builder(builder_utils.ResizedImageBuilder):
    """A user's images + CSV: one-label (class ids) or multi-label (multi-hot), group ids."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: resized JPEGs, labels and group ids from a CSV."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Put your images (loose, in any sub-folders, or in .zip/.tar/.tar.gz archives) and the CSV
    of their labels in the manual directory (--data.manual_dir).
    """

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        s = c.image_size
        label = ({"labels": tfds.features.Tensor(shape=(len(c.class_names),), dtype=np.uint8)}
                 if c.multilabel else {"label": tfds.features.Scalar(dtype=np.int32)})
        return tfds.core.DatasetInfo(
            builder=self,
            description="Images and labels from a user's CSV file.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(s, s, c.channels), encoding_format="jpeg"),
                **label,
                "image_id": tfds.features.Text(),  # the CSV's image name
                "group_id": tfds.features.Text(),  # the group column (the image id without one)
            }),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        c = self.builder_config
        root = self.manual_root
        table = read_table(pathlib.Path(c.csv_path), image_column=c.image_column,
                           label_columns=c.label_columns, label_separator=c.label_separator,
                           group_column=c.group_column)
        found = input_files.index_files(root, IMAGE_SUFFIXES + _ARCHIVE_SUFFIXES)
        files = {name: paths[0] for name, paths in found.items() if not _is_archive(name)}
        members: dict[str, tuple[pathlib.Path, str]] = {}
        for name, paths in sorted(found.items()):
            if _is_archive(name):
                for member in self._list_archive(paths[0]):
                    members.setdefault(member.rsplit("/", 1)[-1], (paths[0], member))
        by_file = self._match(table, {*members, *files}, c.csv_path)
        missing = [r for r in table.records if r.image_id not in by_file]
        if missing:
            raise DataError(
                f"{len(missing)} of the {len(table.records)} images listed in {c.csv_path} "
                f"(column {c.image_column!r}) are not under {root} (loose or in a .zip/.tar "
                f"archive there), e.g. "
                + ", ".join(f"{r.image_id} (line {r.line})" for r in missing[:5])
                + ". Put them there, or pass the --data.manual_dir that holds them.")
        used = set(by_file.values())
        unlisted = sorted(n for n in {*files, *members} if n not in used)
        if unlisted:
            log.warning("csv_images: %d image files under %s are not listed in %s and are left "
                        "out, e.g. %s.", len(unlisted), root, c.csv_path, unlisted[:5])
        self.info.metadata["class_names"] = list(table.class_names)
        self.info.metadata["multilabel"] = table.multilabel
        self.info.metadata["csv"] = c.csv_path
        self.info.metadata["num_unlisted_images"] = len(unlisted)
        loose = {r.image_id: files[by_file[r.image_id]] for r in table.records
                 if by_file[r.image_id] in files}
        archived = collections.defaultdict(dict)  # archive -> member -> record
        for r in table.records:
            if r.image_id not in loose:
                archive, member = members[by_file[r.image_id]]
                archived[archive][member] = r
        return {"train": self._generate_examples(table, loose, dict(archived))}

    @staticmethod
    def _match(table: CsvTable, names: set[str], csv_path: str) -> dict[str, str]:
        """CSV image id -> file name: the same name, else the file whose name without its
        image extension is the id (two such files is a DataError)."""
        stems: dict[str, list[str]] = collections.defaultdict(list)
        for name in names:
            stems[_stem(name)].append(name)
        out = {}
        for r in table.records:
            if r.image_id in names:
                out[r.image_id] = r.image_id
            elif r.image_id in stems:
                candidates = sorted(stems[r.image_id])
                if len(candidates) > 1:
                    raise DataError(f"{csv_path} line {r.line}: image {r.image_id} (no extension) "
                                    f"matches several files {candidates}; write the name with "
                                    "its extension in the CSV.")
                out[r.image_id] = candidates[0]
        return out

    @staticmethod
    def _list_archive(path: pathlib.Path) -> list[str]:
        """The image members of a zip/tar archive (DataError when it cannot be read)."""
        def image(member: str) -> bool:
            base = member.rsplit("/", 1)[-1]
            return (not base.startswith(".") and "__MACOSX" not in member
                    and base.lower().endswith(IMAGE_SUFFIXES))
        try:
            if path.name.lower().endswith(".zip"):
                with zipfile.ZipFile(path) as zf:
                    return [i.filename for i in zf.infolist() if not i.is_dir() and image(i.filename)]
            with tarfile.open(path, mode="r:*") as tar:
                return [m.name for m in tar.getmembers() if m.isfile() and image(m.name)]
        except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
            raise DataError(f"{path} is not a readable archive ({type(e).__name__}: {e}).") from e

    @staticmethod
    def _read_archive(path: pathlib.Path, wanted: dict[str, CsvRecord]
                      ) -> Iterator[tuple[CsvRecord, bytes, str]]:
        try:
            if path.name.lower().endswith(".zip"):
                with zipfile.ZipFile(path) as zf:
                    for info in zf.infolist():
                        if info.filename in wanted:
                            yield (wanted[info.filename], input_files.read_zip_member(zf, info, path),
                                   f"{path}:{info.filename}")
            else:
                with tarfile.open(path, mode="r|*") as tar:
                    for member in tar:
                        if member.isfile() and member.name in wanted:
                            input_files.check_member_size(path, member.name, member.size)
                            yield wanted[member.name], tar.extractfile(member).read(), f"{path}:{member.name}"
        except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
            raise DataError(f"{path} is damaged or incomplete ({type(e).__name__}: {e}).") from e

    def _generate_examples(self, table: CsvTable, loose: dict[str, pathlib.Path], archived):
        mode = "RGB" if self.builder_config.channels == 3 else "L"

        def items():
            for r in table.records:
                if r.image_id in loose:
                    path = loose[r.image_id]
                    try:
                        yield r, path.read_bytes(), str(path)
                    except OSError as e:
                        raise DataError(f"{path} cannot be read ({type(e).__name__}: {e}).") from e
            for archive, wanted in archived.items():
                yield from self._read_archive(archive, wanted)

        def resize(item):
            record, data, name = item
            return record, self._resize_or_skip(data, name, mode)

        for r, jpeg in resizing.ordered_map(resize, items()):
            if jpeg is None:
                continue
            label = ({"labels": np.array(r.labels, np.uint8)} if table.multilabel
                     else {"label": r.label})
            yield r.image_id, {"image": jpeg, **label, "image_id": r.image_id, "group_id": r.group}
