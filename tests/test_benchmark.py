"""experiments.benchmark and benchmark_data on their --tiny configurations: every figure is produced."""
import io
import json
import math

import numpy as np
from PIL import Image

from experiments import benchmark, benchmark_data

# tiny_cnn at 16 px: conv 3x3/2 3->8 (8x8 out) and conv 3x3/2 8->16 (4x4 out), fc 16->8.
TINY_FIRST_CONV_FLOPS = 2 * 8 * 8 * 8 * 3 * 3 * 3
TINY_FORWARD_FLOPS = TINY_FIRST_CONV_FLOPS + 2 * (4 * 4 * 16 * 3 * 3 * 8 + 16 * 8)


def positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_tiny_benchmark_produces_every_figure(tmp_path, capsys):
    out = tmp_path / "bench.json"
    report = benchmark.main(["--tiny", "--dtype", "bfloat16", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    table = capsys.readouterr().out

    device = report["device"]
    assert device["device_count"] == 4 and device["platform"] == "cpu"  # conftest's devices
    assert [r["arch"] for r in report["teachers"]] == ["tiny_cnn"]
    for r in report["teachers"] + report["distill"]:
        assert "error" not in r, r
        for name in ("compile_s", "images_per_s", "flops_per_image", "flop_per_s"):
            assert positive(r[name]), (name, r)
        assert r["mfu"] is None  # no known peak for a CPU
        # bf16 compute keeps parameters, BatchNorm statistics and the loss in float32.
        assert r["precision"] == {"params": "float32", "batch_stats": "float32",
                                  "loss": "float32"}
    teacher = report["teachers"][0]
    assert positive(teacher["fit_images_per_s"]) and positive(teacher["fit_over_bare"])
    # A train step is the forward and both gradients (no input gradient of the first conv),
    # counted over the whole global batch, which the 4 devices split.
    train_flops = 3 * TINY_FORWARD_FLOPS - TINY_FIRST_CONV_FLOPS
    assert teacher["flops_per_image"] == train_flops

    online, cached = report["distill"]
    assert (online["mode"], cached["mode"]) == ("online", "cached")
    assert positive(cached["speedup_over_online"])
    assert cached["flops_per_image"] == train_flops  # the two teachers' forwards are cached
    assert online["flops_per_image"] == train_flops + 2 * TINY_FORWARD_FLOPS
    assert positive(report["cache"]["views_per_s"]) and report["cache"]["views"] == 8
    assert [(r["pipeline"], r["workers"]) for r in report["data"]] == [("online", 0),
                                                                        ("cached", 0)]
    assert all(positive(r["images_per_s"]) for r in report["data"])
    for heading in ("Teacher training", "Distillation step", "Cache build", "Data pipeline"):
        assert heading in table

    benchmark.main(["--print", str(out)])
    assert capsys.readouterr().out.strip() == benchmark.format_table(report)


def test_tiny_data_benchmark_reports_host_part_and_bare_decode(tmp_path):
    report = benchmark_data.main(["--tiny", "--out", str(tmp_path / "data.json")])
    assert json.loads((tmp_path / "data.json").read_text()) == report
    assert positive(report["decode_images_per_s"]) and report["stored_size"] == 32
    (result,) = report["results"]
    for name in ("images_per_s", "host_images_per_s", "host_over_decode"):
        assert positive(result[name]), (name, result)
    assert result["host_over_decode"] == result["host_images_per_s"] / report["decode_images_per_s"]


def test_decoders_give_pils_pixels():
    jpeg = benchmark_data.synthetic_jpegs(1, 24, 40, seed=3)[0]
    reference = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))  # [24, 40, 3]
    for name, decode in benchmark_data.decoders().items():
        np.testing.assert_array_equal(decode(jpeg), reference, err_msg=name)
