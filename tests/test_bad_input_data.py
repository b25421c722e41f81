"""Bad input data: every failure is a DataError naming the file (and row/member), never a
bare trace; odd but harmless values are mapped to unknown and counted.

Expected values are derived by hand here (pixel arithmetic, byte layouts, retry counts from
the documented constants), independently of the builders' code.
"""
import http.server
import io
import logging
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
import zipfile
from unittest import mock

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from rosjax import data
from rosjax.data import DataError, builder_utils, downloads, input_files, isic2019, nih_chestxray14, resizing
from rosjax.data.isic2019 import isic2019_dataset_builder as isic_builder_module

ISIC_DIR = data.sample_dir("isic2019")
NIH_DIR = data.sample_dir("nih_chestxray14")
GT, META = "ISIC_2019_Training_GroundTruth.csv", "ISIC_2019_Training_Metadata.csv"
ZIP = "ISIC_2019_Training_Input.zip"
NIH_CSV = "Data_Entry_2017_v2020.csv"
NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
              "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
META_HEADER = "image,age_approx,anatom_site_general,lesion_id,sex"
REPO = pathlib.Path(__file__).resolve().parents[1]


def nih_row(image, age="58", sex="M", view="PA", follow_up=None):
    follow = str(int(image[9:12])) if follow_up is None else follow_up
    return f"{image},No Finding,{follow},{int(image[:8])},{age},{sex},{view},2500,2048,0.168,0.168"


def write_nih(path, rows):
    path.write_text("\n".join([NIH_HEADER] + rows) + "\n")
    return path


def write_meta(path, rows, encoding="utf-8", bom=b""):
    path.write_bytes(bom + ("\r\n".join([META_HEADER] + rows) + "\r\n").encode(encoding))
    return path


def png16(values, shape=(64, 64)):
    """PNG bytes of a 16-bit greyscale image: horizontal bands of `values` (uint16)."""
    bands = np.repeat(np.array(values, np.uint16), shape[0] // len(values))  # [H]
    arr = np.broadcast_to(bands[:, None], (len(bands), shape[1])).copy()
    out = io.BytesIO()
    PIL.Image.fromarray(arr).save(out, format="PNG")
    assert PIL.Image.open(io.BytesIO(out.getvalue())).mode == "I;16"
    return out.getvalue()


def nih_manual(dst, k=6):
    """A manual dir: the first k rows of the sample label table and their PNGs in images/."""
    (dst / "images").mkdir(parents=True)
    lines = (NIH_DIR / NIH_CSV).read_text().splitlines()[:k + 1]
    (dst / NIH_CSV).write_text("\n".join(lines) + "\n")
    names = [line.split(",")[0] for line in lines[1:]]
    pngs = {}
    for archive in ("images_001.tar.gz", "images_002.tar.gz"):
        with tarfile.open(NIH_DIR / archive) as tar:
            pngs.update({m.name.split("/")[-1]: tar.extractfile(m).read()
                         for m in tar if m.isfile()})
    for name in names:
        (dst / "images" / name).write_bytes(pngs[name])
    return names


def isic_manual(dst, k=4):
    """A manual dir: the first k rows of both ISIC CSVs and the sample zip."""
    dst.mkdir(parents=True)
    for name in (GT, META):
        lines = (ISIC_DIR / name).read_bytes().split(b"\r\n")
        (dst / name).write_bytes(b"\r\n".join(lines[:k + 1]) + b"\r\n")
    shutil.copy(ISIC_DIR / ZIP, dst)
    return [line.split(b",")[0].decode() for line in
            (dst / GT).read_bytes().split(b"\r\n")[1:k + 1]]


def prepare(tmp_path, manual, name="isic2019", **kwargs):
    return data.prepare(name, data_dir=tmp_path / "tfds", manual_dir=manual, image_size=32,
                        **kwargs)


# ------------------------------------------------------------------- 1. 16-bit greyscale

@pytest.mark.parametrize("fmt", ["png_I;16", "tiff_I"])
def test_16_bit_greyscale_is_scaled_not_clipped(fmt):
    # Bands of 0, 32768, 65535 -> round(v * 255 / 65535) = 0, 128 (127.502), 255.
    if fmt == "png_I;16":
        encoded = png16([0, 32768, 65535], shape=(96, 96))
    else:  # 32-bit integer mode 'I' (old Pillow's reading of 16-bit PNGs, TIFFs)
        arr = np.repeat(np.array([0, 32768, 65535], np.int32), 32)[:, None] * np.ones(96, np.int32)
        out = io.BytesIO()
        PIL.Image.fromarray(arr).save(out, format="TIFF")
        encoded = out.getvalue()
        assert PIL.Image.open(io.BytesIO(encoded)).mode == "I"
    for mode, channels in (("L", 1), ("RGB", 3)):
        jpeg = resizing.resize_to_square(encoded, name="x", mode=mode, size=96)
        img = np.asarray(PIL.Image.open(io.BytesIO(jpeg)), np.float32).reshape(96, 96, channels)
        for band, expected in enumerate((0, 128, 255)):
            centre = img[32 * band + 8:32 * band + 24, 8:88]  # 8x8 JPEG blocks inside the band
            assert np.abs(centre - expected).max() <= 1, (mode, band, centre.min(), centre.max())


def test_16_bit_pngs_are_stored_with_their_grey_levels(tmp_path):
    names = nih_manual(tmp_path / "manual", k=6)
    for name, value in zip(names[:3], (0, 32768, 65535)):
        (tmp_path / "manual" / "images" / name).write_bytes(png16([value]))
    ds = prepare(tmp_path, tmp_path / "manual", name="nih_chestxray14")
    rows = {n: i for i, n in enumerate(ds.metadata["image_id"])}
    for name, expected in zip(names[:3], (0, 128, 255)):
        image = ds.source[rows[name]]["image"]  # uint8 [32, 32, 1]
        assert image.shape == (32, 32, 1)
        assert np.abs(image.astype(int) - expected).max() <= 1, (name, image.min(), image.max())


# -------------------------------------------------------------------------- 2. encodings

def test_csv_with_utf8_bom_utf16_or_cp1252_parses_to_the_same_values(tmp_path):
    rows = ["ISIC_0000001,55.0,head/neck,HAM_caf\u00e9,female", "ISIC_0000002,,,,male"]
    expected = {"ISIC_0000001": ("HAM_caf\u00e9", 55, "head/neck", "female"),
                "ISIC_0000002": ("", -1, "", "male")}
    for name, encoding, bom in (("bom.csv", "utf-8", b"\xef\xbb\xbf"),
                                ("utf16.csv", "utf-16-le", b"\xff\xfe"),
                                ("cp1252.csv", "cp1252", b"")):
        path = write_meta(tmp_path / name, rows, encoding, bom)
        assert isic2019.csv_files.read_metadata(path) == expected, name
    # The cp1252 file really is not UTF-8 ('\u00e9' is the single byte 0xE9 there).
    assert b"caf\xe9," in (tmp_path / "cp1252.csv").read_bytes()


def test_undecodable_or_binary_csv_is_a_data_error_naming_file_and_line(tmp_path):
    # 0x81 is invalid in UTF-8 (a lone continuation byte) and undefined in cp1252.
    path = tmp_path / META
    path.write_bytes(f"{META_HEADER}\r\nISIC_0000001,55.0,,,male\r\nISIC_0000002,,,HAM_\x81,\r\n"
                     .encode("latin-1"))
    with pytest.raises(DataError, match=f"{META} line 3: byte 0x81"):
        isic2019.csv_files.read_metadata(path)
    path.write_bytes(f"{META_HEADER}\nISIC_0000001,5\x00\x00,,,\n".encode())
    with pytest.raises(DataError, match=f"{META} line 2 holds NUL bytes"):
        isic2019.csv_files.read_metadata(path)
    # The NIH lists go through the same decoding.
    (tmp_path / "test_list.txt").write_bytes(b"00000001_000.png\n\x81\x81\n")
    with pytest.raises(DataError, match="test_list.txt line 2"):
        nih_chestxray14.read_image_list(tmp_path / "test_list.txt")


# ------------------------------------------------------------------------ 3. integer ranges

def test_nih_ages_outside_0_to_150_are_unknown_and_counted(tmp_path, caplog):
    path = write_nih(tmp_path / NIH_CSV, [
        nih_row("00000001_000.png", age="1000000000000"),  # line 2: would overflow int32
        nih_row("00000002_000.png", age="151"),            # line 3
        nih_row("00000003_000.png", age="150"),            # line 4: kept
        nih_row("00000004_000.png", age="414Y"),           # line 5: like the 2017 table
        nih_row("00000005_000.png", age="011M"),           # line 6: 330 days -> 0 years
    ])
    with caplog.at_level(logging.WARNING):
        records = nih_chestxray14.read_label_csv(path)
    assert [r.age for r in records] == [-1, -1, 150, -1, 0]
    assert "3 rows have a Patient Age above 150" in caplog.text
    assert "line 2: '1000000000000'" in caplog.text and NIH_CSV in caplog.text
    for bad in ("-5", "1e12"):
        write_nih(path, [nih_row("00000001_000.png"), nih_row("00000002_000.png", age=bad)])
        with pytest.raises(DataError, match=f"line 3 .*Patient Age '{bad}'"):
            nih_chestxray14.read_label_csv(path)


def test_nih_follow_up_outside_int32_names_the_row(tmp_path):
    path = tmp_path / NIH_CSV
    for bad in ("2147483648", "-1"):
        write_nih(path, [nih_row("00000001_000.png"), nih_row("00000001_001.png", follow_up=bad)])
        with pytest.raises(DataError, match=f"{NIH_CSV} line 3 \\(image 00000001_001.png\\): "
                                            f"Follow-up # {bad} is outside"):
            nih_chestxray14.read_label_csv(path)


def test_nih_huge_age_prepares_and_is_stored_as_unknown(tmp_path):
    names = nih_manual(tmp_path / "manual", k=4)
    table = tmp_path / "manual" / NIH_CSV
    lines = table.read_text().splitlines()
    fields = lines[2].split(",")
    fields[4] = "1000000000000"
    lines[2] = ",".join(fields)
    table.write_text("\n".join(lines) + "\n")
    ds = prepare(tmp_path, tmp_path / "manual", name="nih_chestxray14")
    ages = dict(zip(ds.metadata["image_id"], ds.metadata["age"]))
    assert ages[names[1]] == -1 and len(ds) == 4


def test_isic_ages_outside_0_to_150_are_unknown_and_counted(tmp_path, caplog):
    path = write_meta(tmp_path / META, [
        "ISIC_0000001,-5,,,", "ISIC_0000002,1e12,,,", "ISIC_0000003,85.0,,,",
        "ISIC_0000004,inf,,,", "ISIC_0000005,0,,,"])
    with caplog.at_level(logging.WARNING):
        meta = isic2019.csv_files.read_metadata(path)
    assert [v[1] for v in meta.values()] == [-1, -1, 85, -1, 0]
    assert "3 rows have an age_approx outside 0..150" in caplog.text
    assert "line 2: '-5'" in caplog.text
    write_meta(path, ["ISIC_0000001,55,,,", "ISIC_0000002,nan,,,"])
    with pytest.raises(DataError, match=f"{META} line 3 \\(image ISIC_0000002\\): age_approx"):
        isic2019.csv_files.read_metadata(path)


# ----------------------------------------------------------------------- 4. categoricals

def test_nih_unknown_sex_and_view_are_mapped_to_unknown_and_counted(tmp_path, caplog):
    path = write_nih(tmp_path / NIH_CSV, [
        nih_row("00000001_000.png", sex="X", view="LL"),  # line 2
        nih_row("00000002_000.png", sex="f", view="pa"),  # line 3: case is ignored
        nih_row("00000003_000.png", sex="M", view="AP"),
        nih_row("00000004_000.png", sex="O", view="LATERAL"),  # line 5
    ])
    with caplog.at_level(logging.WARNING):
        records = nih_chestxray14.read_label_csv(path)
    assert [(r.sex, r.view_position) for r in records] == [
        ("", ""), ("F", "PA"), ("M", "AP"), ("", "")]
    assert "2 rows have Patient Gender values outside" in caplog.text
    assert "2 rows have View Position values outside" in caplog.text
    assert "line 2: 'LL'" in caplog.text and "line 5: 'LATERAL'" in caplog.text


def test_isic_unknown_sex_and_site_are_mapped_to_unknown_and_counted(tmp_path, caplog):
    path = write_meta(tmp_path / META, [
        "ISIC_0000001,50,moon,,X",                     # line 2: both unknown
        "ISIC_0000002,50,Palms/Soles,,MALE",           # line 3: case is ignored
        "ISIC_0000003,50,anterior torso,,female",
        "ISIC_0000004,50,,,"])                         # empty = unknown, not counted
    with caplog.at_level(logging.WARNING):
        meta = isic2019.csv_files.read_metadata(path)
    assert [(v[2], v[3]) for v in meta.values()] == [
        ("", ""), ("palms/soles", "male"), ("anterior torso", "female"), ("", "")]
    assert "1 rows have sex values outside" in caplog.text and "line 2: 'X'" in caplog.text
    assert "1 rows have anatom_site_general values outside" in caplog.text
    assert "line 2: 'moon'" in caplog.text


# ------------------------------------------------------------------ 5. archive member cap

class _Spy:
    """Records the member names passed to a wrapped archive method."""

    def __init__(self, fn):
        self.fn, self.names = fn, []

    def __get__(self, obj, owner):
        def call(member, *args, **kwargs):
            self.names.append(getattr(member, "filename", getattr(member, "name", member)))
            return self.fn(obj, member, *args, **kwargs)
        return call


def test_oversized_zip_member_is_refused_before_it_is_read(tmp_path, monkeypatch):
    images = isic_manual(tmp_path / "manual", k=4)
    big = f"ISIC_2019_Training_Input/{images[2]}.jpg"
    with zipfile.ZipFile(ISIC_DIR / ZIP) as src, \
            zipfile.ZipFile(tmp_path / "manual" / ZIP, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info, b"\0" * (1 << 20) if info.filename == big else src.read(info))
    assert (tmp_path / "manual" / ZIP).stat().st_size < 200_000  # 1 MiB of zeros: ~1 KB
    monkeypatch.setattr(input_files, "MAX_MEMBER_BYTES", 256 << 10)
    spy = _Spy(zipfile.ZipFile.open)
    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    with pytest.raises(DataError) as e:
        prepare(tmp_path, tmp_path / "manual")
    msg = str(e.value)
    assert f"{tmp_path / 'manual' / ZIP}: member {big} is 1,048,576 bytes" in msg
    assert "262,144" in msg
    assert big not in spy.names and len(spy.names) >= 1  # smaller members were opened


def test_oversized_tar_member_is_refused_before_it_is_read(tmp_path, monkeypatch):
    names = nih_manual(tmp_path / "manual", k=4)
    shutil.rmtree(tmp_path / "manual" / "images")
    archive = tmp_path / "manual" / "images_001.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for i, name in enumerate(names):
            payload = b"\0" * (1 << 20) if i == 1 else png16([1000])
            info = tarfile.TarInfo(f"images/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    assert archive.stat().st_size < 200_000
    monkeypatch.setattr(input_files, "MAX_MEMBER_BYTES", 256 << 10)
    spy = _Spy(tarfile.TarFile.extractfile)
    monkeypatch.setattr(tarfile.TarFile, "extractfile", spy)
    with pytest.raises(DataError, match=f"{archive}: member images/{names[1]} is 1,048,576 "
                                        "bytes uncompressed"):
        prepare(tmp_path, tmp_path / "manual", name="nih_chestxray14")
    assert spy.names == [f"images/{names[0]}"]


# ------------------------------------------------------------------------- 7. downloads

def _no_network(*args, **kwargs):
    raise AssertionError("the network was used with download='never'")


def test_download_never_names_every_missing_file_at_once(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    shutil.copy(ISIC_DIR / META, manual)
    with mock.patch.object(tfds.download.DownloadManager, "download", _no_network), \
            mock.patch.object(downloads, "unreachable", _no_network):
        start = time.monotonic()
        with pytest.raises(DataError) as e:
            prepare(tmp_path, manual, download="never")
        assert time.monotonic() - start < 1.0
    msg = str(e.value)
    assert str(manual / GT) in msg and str(manual / ZIP) in msg and str(manual / META) not in msg
    assert "--data.download=auto" in msg
    with pytest.raises(ValueError, match="download=False"):
        prepare(tmp_path, manual, download=False)  # the old meaning of `download`


def test_download_never_nih_names_the_twelve_archives(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    shutil.copy(NIH_DIR / NIH_CSV, manual)
    with mock.patch.object(tfds.download.DownloadManager, "download", _no_network), \
            mock.patch.object(downloads, "unreachable", _no_network):
        start = time.monotonic()
        with pytest.raises(DataError) as e:
            prepare(tmp_path, manual, name="nih_chestxray14", download="never")
        assert time.monotonic() - start < 1.0
    for i in range(1, 13):
        assert str(manual / f"images_{i:03d}.tar.gz") in str(e.value)


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once closed


def test_download_auto_offline_fails_fast_naming_file_and_manual_dir(tmp_path, monkeypatch):
    port = _closed_port()
    monkeypatch.setattr(isic_builder_module, "HOSTS",
                        (f"http://127.0.0.1:{port}/a/", f"http://127.0.0.1:{port}/b/"))
    manual = tmp_path / "manual"
    manual.mkdir()
    start = time.monotonic()
    with pytest.raises(DataError) as e:
        prepare(tmp_path, manual)
    assert time.monotonic() - start < 20
    msg = str(e.value)
    assert f"Could not download {GT}" in msg and str(manual) in msg and "unreachable" in msg


class _Status503(http.server.BaseHTTPRequestHandler):
    hits: list = []

    def do_GET(self):  # noqa: N802
        self.hits.append(self.path)
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_download_auto_retries_a_failing_host_only_a_few_times(tmp_path, monkeypatch):
    """TFDS retries a 503 ten times with backoff (~200 s per URL); here 1 + 2 requests."""
    _Status503.hits = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Status503)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    monkeypatch.setattr(isic_builder_module, "HOSTS",
                        (f"http://127.0.0.1:{port}/a/", f"http://127.0.0.1:{port}/b/"))
    (tmp_path / "manual").mkdir()
    try:
        start = time.monotonic()
        with pytest.raises(DataError, match=f"Could not download {GT}"):
            prepare(tmp_path, tmp_path / "manual")
        assert time.monotonic() - start < 20
    finally:
        server.shutdown()
        server.server_close()
    # GT is the first input read: 3 requests to each host, then the error.
    assert sorted(_Status503.hits) == [f"/a/{GT}"] * 3 + [f"/b/{GT}"] * 3


# -------------------------------------------------------------------- 8. read-only data_dir

def _read_only_runner(folder):
    """argv prefix running a shell command in a private mount namespace, or None."""
    prefix = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]
    if shutil.which("unshare") is None:
        return None
    folder.mkdir()
    probe = subprocess.run(prefix + ["sh", "-c", f"mount --bind -o ro '{folder}' '{folder}' && "
                                     f"! touch '{folder}/x' 2>/dev/null"],
                           capture_output=True, timeout=30)
    return prefix if probe.returncode == 0 else None


def test_read_only_data_dir_opens_a_prepared_dataset_and_names_the_folder_otherwise(tmp_path):
    runner = _read_only_runner(tmp_path / "probe")
    if runner is None:
        pytest.skip("needs unshare to mount a read-only data dir")
    isic_manual(tmp_path / "manual", k=4)
    data_dir = tmp_path / "tfds"
    prepare(tmp_path, tmp_path / "manual")
    # Without its column cache the open must compute the columns and skip the cache write.
    (data_dir / "isic2019" / "32" / "1.0.0" / builder_utils.COLUMNS_FILE).unlink()
    script = textwrap.dedent(f"""
        from rosjax import data
        ds = data.prepare("isic2019", data_dir={str(data_dir)!r}, image_size=32)
        print("OPENED", len(ds), sorted(map(str, ds.metadata["image_id"])))
        try:
            data.prepare("isic2019", data_dir={str(data_dir)!r}, image_size=64,
                         manual_dir={str(tmp_path / 'manual')!r})
        except data.DataError as e:
            print("ERROR", e)
    """)
    (tmp_path / "script.py").write_text(script)
    proc = subprocess.run(
        runner + ["sh", "-c", f"mount --bind -o ro '{data_dir}' '{data_dir}' && "
                              f"'{sys.executable}' '{tmp_path / 'script.py'}'"],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    images = sorted(isic_reference_ids(tmp_path / "manual"))
    assert f"OPENED 4 {images}" in proc.stdout
    assert f"ERROR isic2019 at 64 px is not prepared in {data_dir}" in proc.stdout
    assert f"{data_dir / 'isic2019'} is not writable" in proc.stdout
    assert not (data_dir / "isic2019" / "32" / "1.0.0" / builder_utils.COLUMNS_FILE).exists()


def isic_reference_ids(folder):
    return [line.split(",")[0] for line in (folder / GT).read_text().splitlines()[1:]]


# ----------------------------------------------------------------------- 9. concurrency

def test_three_processes_preparing_one_fresh_data_dir_all_succeed(tmp_path):
    data_dir, go = tmp_path / "tfds", tmp_path / "go"
    script = textwrap.dedent(f"""
        import os, time
        from rosjax import data
        open({str(tmp_path)!r} + f"/ready.{{os.getpid()}}", "w").close()
        while not os.path.exists({str(go)!r}):
            time.sleep(0.01)
        ds = data.prepare("isic2019", data_dir={str(data_dir)!r}, image_size=32,
                          manual_dir={str(ISIC_DIR)!r})
        print("LEN", len(ds), int(ds.labels.sum()))
    """)
    (tmp_path / "script.py").write_text(script)
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "script.py")], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("ready.*"))) < 3 and time.monotonic() < deadline:
            if any(p.poll() is not None for p in procs):
                break
            time.sleep(0.05)
        go.touch()  # all three call prepare() at the same moment
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    labels = [line.split(",")[1:9] for line in (ISIC_DIR / GT).read_text().splitlines()[1:]]
    label_sum = sum(row.index("1.0") for row in labels)
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert f"LEN 120 {label_sum}" in out
    assert sorted(os.listdir(data_dir / "isic2019" / "32")) == ["1.0.0"]  # no leftovers
