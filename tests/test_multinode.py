"""Label collection across machines: two `accelerate launch` nodes on loopback equal one process.

Each node is its own `accelerate launch --num_machines 2 --machine_rank R` (one process per node,
gloo over 127.0.0.1), as on two real machines sharing an output folder; the result must be the
single-process collection, label for label: the same examples and skipped rows, bitwise the same
tokens, spans, region assignments, masks and measured effects. The attention features agree to
float32 rounding (measured: at most 4e-9 apart, on values near 0.02): the same rows summed in
another order in a process that runs in a distributed group; the cause is not pinned down.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_userdata import write_sample

from vstream.attr.labels import load_labels

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _skipped(folder: Path) -> dict[int, str]:
    out = {}
    for side in folder.glob("labels-*.json"):
        out.update({int(s["index"]): s["why"] for s in json.loads(side.read_text())["skipped"]})
    return out


def test_two_loopback_nodes_equal_one_process(tmp_path, tiny_qwen2_5_vl_dir):
    data = write_sample(tmp_path / "data", "jsonl")
    args = ["-m", "vstream", "collect", "--model", str(tiny_qwen2_5_vl_dir), "--data", str(data)]
    args += ["--masks", "4", "--max-new-tokens", "10", "--shard-size", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    port = str(_free_port())
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2"]
            + ["--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port]
            + ["--num_processes", "2", "--num_cpu_threads_per_process", "1"]
            + args
            + ["--out", str(tmp_path / "two")],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outs = [n.communicate(timeout=600) for n in nodes]
    for n, (_, err) in zip(nodes, outs):
        assert n.returncode == 0, err[-3000:]
    summary = json.loads(outs[0][0].strip().splitlines()[-1])
    assert summary["processes"] == 2
    one = subprocess.run(
        [sys.executable, *args, "--out", str(tmp_path / "one")], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert one.returncode == 0, one.stderr[-3000:]

    cfg2, two = load_labels(tmp_path / "two")
    cfg1, single = load_labels(tmp_path / "one")
    assert cfg1 == cfg2
    assert [e.index for e in two] == [e.index for e in single] and single
    assert _skipped(tmp_path / "two") == _skipped(tmp_path / "one")
    for a, b in zip(two, single):
        assert a.span_texts == b.span_texts and a.span_ranges == b.span_ranges and a.question == b.question
        for name in ("masks", "effects", "base", "assignment", "tokens"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (a.index, name)
        torch.testing.assert_close(a.features, b.features, atol=1e-7, rtol=1e-5)
