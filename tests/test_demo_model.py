"""The demo model's data path, training loop (incl. resume) and evaluation command."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from vstream.cli import train_demo as train_demo_cli
from vstream.model import VLMError, load_vlm
from vstream.world import train_demo
from vstream.world.assets import DEMO_MODEL_DIR
from vstream.world.demo_model import (
    MERGE,
    PATCH,
    Collator,
    make_image_processor,
    make_tokenizer,
)
from vstream.world.eval_model import check_heldout, evaluate, parse_answer
from vstream.world.shapes import HELDOUT_SEEDS, SCALE, SHORT_FAMILIES, SIZE, VAL_SEEDS, scenes

SIDE = SIZE * SCALE // train_demo.TOKEN_PX  # image tokens per side of a still scene


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_probe_targets_name_the_objects_and_the_cells_the_trace_says():
    import re

    n = 0
    for scene in scenes("train", 0, 60):
        if scene.family != "spatial":
            continue
        t = train_demo.token_targets(scene)
        assert t.shape == (SIDE * SIDE, 5)
        for obj_text, axis, num in re.findall(r"The (\w+ \w+) is in (row|column) (\d)", scene.trace):
            color, shape = obj_text.split()
            i = next(i for i, o in enumerate(scene.objects) if (o.color, o.shape) == (color, shape))
            x0, y0, x1, y1 = scene.box(i)
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            tok_i = (cy // train_demo.TOKEN_PX) * SIDE + cx // train_demo.TOKEN_PX
            assert t[tok_i, 3 if axis == "row" else 4].item() == int(num) - 1  # what the trace says, 0-based
            assert t[tok_i, 0].item() == list(train_demo.COLORS).index(color) + 1
            assert t[tok_i, 1].item() == train_demo.KINDS.index(shape) + 1
            n += 1
    assert n > 5


def test_collator_masks_prompt_and_covers_trace(tok):
    batch = scenes("train", 0, 4)
    out = Collator(tok, make_image_processor())(batch)
    assert out["pixel_values"].shape == (4 * MERGE**2 * SIDE * SIDE, 3 * 2 * PATCH * PATCH)  # 4 images; RGB x 2 frames
    for i, s in enumerate(batch):
        lab = out["labels"][i]
        text = tok.decode(lab[lab != -100])
        assert text == s.trace + "<|im_end|>"
        assert int(out["mm_token_type_ids"][i].sum()) == SIDE * SIDE  # one per 56 px cell
    left = Collator(tok, make_image_processor(), padding_side="left")(batch, with_targets=False)
    assert "labels" not in left and (left["attention_mask"][:, -1] == 1).all()


def test_tokenizer_is_deterministic(tok):
    again = make_tokenizer()
    assert tok.get_vocab() == again.get_vocab()
    assert tok.decode(tok("What color is the élan? 🟥").input_ids) == "What color is the élan? 🟥"


@pytest.mark.slow
def test_train_resume_and_load(tmp_path, monkeypatch):
    out, run = tmp_path / "model", tmp_path / "run"
    args = ["--batch-size", "2", "--out", str(out), "--run-dir", str(run), "--save-every", "1"]
    train_demo_cli.main(["--steps", "2", *args])
    assert json.loads((run / "latest" / "step.json").read_text())["step"] == 2
    # a resumed run keeps its vocabulary even if the world's text (the BPE's corpus) changed since
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    monkeypatch.setattr(train_demo, "make_tokenizer", lambda: pytest.fail("a resumed run retrained its BPE"))
    train_demo_cli.main(["--steps", "3", "--workers", "1", *args])  # resumes at step 2, does one more (loader process)
    meta = json.loads((out / "training.json").read_text())
    assert meta["trained_steps"] == 3 and meta["train_seeds"][1] <= HELDOUT_SEEDS.start
    vlm = load_vlm(str(out))
    assert vlm.model.dtype == torch.float32  # float16 on disk, float32 on CPU
    res = evaluate(vlm, n=6, batch_size=6, progress=False)
    assert res["n"] == 6 and 0.0 <= res["accuracy"] <= 1.0
    assert res["split"] == "heldout" and res["seeds"] == [HELDOUT_SEEDS[0], HELDOUT_SEEDS[5]]
    res = evaluate(vlm, n=6, start=10, batch_size=6, progress=False, split="val")
    assert res["split"] == "val" and res["seeds"] == [VAL_SEEDS[10], VAL_SEEDS[15]]


def test_position_probe_adds_row_and_column_heads(tok):
    from vstream.world.demo_model import build_demo_model

    batch = scenes("train", 0, 2)
    inputs = train_demo.TrainCollator(tok, make_image_processor())(batch)
    for position, heads in ((False, 3), (True, 5)):
        torch.manual_seed(0)
        m = train_demo.WithProbe(build_demo_model(tok), tok, position=position)
        loss, probe = m(**inputs)
        assert len(m.probe_logits(torch.zeros(SIDE * SIDE, m.none.shape[1]))) == heads
        assert torch.isfinite(loss) and probe > 0
        loss.backward()
        if position:
            assert m.pos.grad is not None and m.pos.grad.abs().sum() > 0


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not on PATH")
def test_accelerate_data_parallel_on_two_cpu_processes(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` without GPUs = 2 gloo processes on CPU."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    cmd = [
        shutil.which("accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "vstream",
        "train-demo",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--out",
        str(tmp_path / "m"),
        "--run-dir",
        str(tmp_path / "r"),
    ]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((tmp_path / "m" / "training.json").read_text())
    assert meta["processes"] == 2 and meta["batch_size"] == 4 and meta["train_seeds"] == [0, 8]


def test_lr_schedule_warms_up_anneals_and_follows_the_time_budget():
    from vstream.world.checkpoints import lr_at

    lrs = [lr_at(s, 200, 1.0, 50) for s in range(200)]
    assert lrs[0] == pytest.approx(1 / 20) and lrs[19] == pytest.approx(1.0)  # warm-up capped at total // 10
    assert all(a >= b for a, b in zip(lrs[19:], lrs[20:])) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
    # a run that has spent 90% of its minutes is annealed that far, whatever its step count says
    assert lr_at(30, 200, 1.0, 10, time_frac=0.9) == pytest.approx(lr_at(181, 200, 1.0, 10))
    assert lr_at(10_000, 200, 1.0, 10) == pytest.approx(0.1)  # past the end: the floor


def test_heldout_overlap_is_refused(tmp_path):
    (tmp_path / "training.json").write_text(json.dumps({"train_seeds": [0, HELDOUT_SEEDS.start + 5]}))
    with pytest.raises(VLMError, match="held-out"):
        check_heldout(tmp_path)
    (tmp_path / "training.json").write_text(json.dumps({"train_seeds": [0, VAL_SEEDS.start + 5]}))
    check_heldout(tmp_path)  # leaks into validation only
    with pytest.raises(VLMError, match="validation"):
        check_heldout(tmp_path, "val")


def test_parse_answer():
    assert parse_answer("<think> The red box shows 7. </think> 7<|im_end|>") == "7"
    assert parse_answer("<think> no end") == ""
    assert parse_answer("<think> a. </think> Yes.") == "yes"


@pytest.mark.skipif(not (DEMO_MODEL_DIR / "model.safetensors").exists(), reason="demo model not trained yet")
def test_shipped_demo_model_reads_the_image():
    """Its traces must depend on the image: teacher-forced loss on held-out scenes rises clearly
    when each question is paired with another scene's image (a model that ignores the image,
    as our first training recipe produced, scores the same on both)."""
    vlm = load_vlm(str(DEMO_MODEL_DIR))
    # the six short families: every shipped demo model has been trained on them
    items = [s for s in scenes("heldout", 60_000, 48) if s.family in SHORT_FAMILIES][:24]
    batch = Collator(vlm.tokenizer, vlm.image_processor)(items)
    shuffled = dict(batch)
    pv = batch["pixel_values"].view(24, -1, batch["pixel_values"].shape[-1])
    shuffled["pixel_values"] = pv.roll(1, 0).flatten(0, 1)
    with torch.inference_mode():
        true_loss = vlm.model(**batch).loss.item()
        wrong_loss = vlm.model(**shuffled).loss.item()
    assert wrong_loss > 1.3 * true_loss, (true_loss, wrong_loss)
