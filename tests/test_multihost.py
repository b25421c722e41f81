"""Two processes joined by jax.distributed (gloo on CPU) train like one process."""
import pathlib
import socket
import subprocess
import sys

import _train_worker as tw
import jax
import numpy as np

from rosjax.train import parallel

WORKER = pathlib.Path(__file__).with_name("_train_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_each_other_and_one_process(tmp_path):
    port = _free_port()
    outs = [tmp_path / f"params_{i}.npz" for i in range(2)]
    procs = [subprocess.Popen(
        [sys.executable, str(WORKER), "multihost", "--port", str(port), "--process-id", str(i),
         "--num-processes", "2", "--workdir", str(tmp_path / "run"), "--out", str(outs[i])],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        logs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    report = "\n".join(f"--- process {i} (exit {p.returncode}):\n{text[-2500:]}"
                       for i, (p, text) in enumerate(zip(procs, logs)))
    assert all(p.returncode == 0 for p in procs), report

    # Each process held 2 of the 4 devices and fed 4 of the 8 rows of every global batch.
    results = [dict(np.load(out)) for out in outs]
    assert all(int(r.pop("devices")) == 4 for r in results)
    assert results[0].keys() == results[1].keys() and results[0]
    for name in results[0]:
        np.testing.assert_array_equal(results[0][name], results[1][name], err_msg=name)

    # The same global batches in one process on 4 devices give the same parameters.
    reference = tw.run_fit(tmp_path / "single", parallel.make_mesh(), epochs=1,
                           cfg=tw.loop_config(checkpoint_every_steps=0))
    flat = {jax.tree_util.keystr(path): leaf for path, leaf in
            jax.tree_util.tree_flatten_with_path(jax.device_get(reference.state.params))[0]}
    assert flat.keys() == results[0].keys()
    for name, value in flat.items():
        np.testing.assert_allclose(results[0][name], value, rtol=1e-5, atol=1e-5, err_msg=name)
    # Both processes wrote their own iterator position into the shared checkpoint.
    step_dir = tmp_path / "run" / "ckpt" / str(tw.STEPS_PER_EPOCH) / "data"
    assert sorted(p.name for p in step_dir.glob("process_*.json")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
