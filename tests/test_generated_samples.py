"""Generated sample sets (rosjax.data.make_samples.generated_sample_dir): sizes, look, caching.

The references are the bundled files (the default size and look must reproduce them), the
CSV files read with the `csv` module, and the images decoded with PIL.
"""
import csv
import io
import multiprocessing
import zipfile

import numpy as np
import PIL.Image
import pytest

from rosjax import data
from rosjax.data import make_samples

ISIC_GT = "ISIC_2019_Training_GroundTruth.csv"


def files_of(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def isic_labels(folder):
    """image -> class index, read with the csv module."""
    with open(folder / ISIC_GT, newline="") as f:
        rows = list(csv.reader(f))
    return {r[0]: r[1:].index("1.0") for r in rows[1:]}


def isic_mean_colours(folder):
    """Mean RGB [N, 3] of every image and its class [N], decoded with PIL."""
    labels = isic_labels(folder)
    with zipfile.ZipFile(folder / "ISIC_2019_Training_Input.zip") as zf:
        means = [np.asarray(PIL.Image.open(io.BytesIO(zf.read(f"ISIC_2019_Training_Input/{n}.jpg"))),
                            np.float64).mean((0, 1)) for n in labels]
    return np.array(means), np.array(list(labels.values()))


@pytest.mark.parametrize("dataset", ["isic2019", "nih_chestxray14"])
def test_default_size_and_look_reproduce_the_bundled_files_byte_for_byte(tmp_path, dataset):
    folder = make_samples.generated_sample_dir(dataset, 15, root=tmp_path)
    assert folder == tmp_path / f"{dataset}-15"
    bundled = files_of(data.sample_dir(dataset))
    generated = files_of(folder)
    assert generated.keys() == bundled.keys()
    for rel, content in bundled.items():
        assert generated[rel] == content, rel


def test_generated_isic_set_prepares_with_the_real_builder(tmp_path):
    folder = make_samples.generated_sample_dir("isic2019", 40, difficulty=0.5, root=tmp_path / "samples")
    assert folder.name == "isic2019-40-0.5"
    ds = data.prepare("isic2019", data_dir=tmp_path / "tfds", manual_dir=folder, image_size=32)
    assert len(ds) == 320
    np.testing.assert_array_equal(np.bincount(ds.labels, minlength=8), [40] * 8)
    reference = isic_labels(folder)
    assert dict(zip(ds.metadata["image_id"], ds.labels.tolist())) == reference


def test_generated_nih_set_prepares_with_its_official_lists(tmp_path):
    folder = make_samples.generated_sample_dir("nih_chestxray14", 30, difficulty=1.0, root=tmp_path / "samples")
    ds = data.prepare("nih_chestxray14", data_dir=tmp_path / "tfds", manual_dir=folder, image_size=32)
    assert len(ds) == 8 * 30
    test_images = {line.strip() for line in open(folder / "test_list.txt") if line.strip()}
    assert set(ds.metadata["image_id"][ds.official_test]) == test_images
    patients = set(ds.groups)
    assert len(patients) == 2 * (20 * 30 // 15)
    assert len(set(ds.groups[ds.official_test])) == len(patients) // 4


def test_same_arguments_same_bytes_other_arguments_other_images(tmp_path):
    a = files_of(make_samples.generated_sample_dir("isic2019", 20, difficulty=0.7, root=tmp_path / "a"))
    b = files_of(make_samples.generated_sample_dir("isic2019", 20, difficulty=0.7, root=tmp_path / "b"))
    c = files_of(make_samples.generated_sample_dir("isic2019", 20, difficulty=0.3, root=tmp_path / "c"))
    assert a == b
    zip_name = next(k for k in a if k.suffix == ".zip")
    assert a[zip_name] != c[zip_name]


def test_difficulty_takes_away_the_mean_colour_shortcut(tmp_path):
    """A nearest-class-mean rule on the images' mean RGB (fitted on half, scored on the other
    half) nearly solves the bundled look and falls far below that with realistic variation."""
    def nearest_mean_accuracy(folder):
        x, y = isic_mean_colours(folder)
        rng = np.random.default_rng(0)
        fit = rng.permutation(len(y))[: len(y) // 2]
        held = np.setdiff1d(np.arange(len(y)), fit)
        centres = np.stack([x[fit][y[fit] == c].mean(0) for c in range(8)])  # [8, 3]
        pred = np.argmin(((x[held, None] - centres[None]) ** 2).sum(-1), axis=1)
        return float((pred == y[held]).mean())

    plain = nearest_mean_accuracy(make_samples.generated_sample_dir("isic2019", 60, root=tmp_path))
    varied = nearest_mean_accuracy(make_samples.generated_sample_dir("isic2019", 60, difficulty=1.0,
                                                                     root=tmp_path))
    assert plain > 0.55
    assert varied < plain - 0.2


def _generate(root):
    return str(make_samples.generated_sample_dir("isic2019", 10, difficulty=0.5, root=root))


def test_concurrent_calls_give_one_folder(tmp_path):
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        paths = pool.map(_generate, [tmp_path] * 3)
    assert len(set(paths)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["isic2019-10-0.5"]  # no temporary leftovers
    assert files_of(tmp_path / "isic2019-10-0.5") == files_of(
        make_samples.generated_sample_dir("isic2019", 10, difficulty=0.5, root=tmp_path / "serial"))


def test_bad_sizes_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="per_class=0"):
        make_samples.generated_sample_dir("isic2019", 0, root=tmp_path)
    with pytest.raises(ValueError, match="difficulty=1.5"):
        make_samples.generated_sample_dir("isic2019", 10, difficulty=1.5, root=tmp_path)
    with pytest.raises(ValueError, match="csv_images"):
        make_samples.generated_sample_dir("csv_images", 10, root=tmp_path)
    assert not any(tmp_path.iterdir())
