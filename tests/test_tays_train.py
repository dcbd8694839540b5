"""TaYS training: the token layout of each paradigm, the training forward == the inference code
path (TaYS: the StreamingEngine's incremental decode; batch / interleaved: CausalSequence), a
2-step run per paradigm that resumes and saves, and `evaluate` printing its JSON on held-out
streams. Everything on the tiny random Qwen2.5-VL (4x4 tokens per frame group)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tays.data import TfidfEncoder, build_trajectory, shapes_sample
from tays.engine import StreamingEngine
from tays.paradigms import CausalSequence
from tays.protocol import PARADIGMS
from tays.train import (
    IGNORE,
    StreamingLM,
    TrajectoryCollator,
    build_layout,
    reasoning_tokens,
)
from vstream.model import END_OF_STEP
from vstream.world.shapes import HELDOUT_SEEDS, TRAIN_SEEDS, VAL_SEEDS, split_of
from vstream.world.shapes_video import make_stream

ATOL = 1e-4


@pytest.fixture(scope="module")
def traj():
    """6 s stream: 12 frames = 6 groups, 3 steps (groups 1, 3, 5)."""
    return build_trajectory(shapes_sample(make_stream(7, duration=6.0)), TfidfEncoder())


def test_reasoning_tokens_per_paradigm(tiny_qwen2_5_vl, traj):
    tok = tiny_qwen2_5_vl.tokenizer
    eot = tok.convert_tokens_to_ids(END_OF_STEP)
    end = tok.convert_tokens_to_ids("</think>")
    G = traj.n_groups
    assert [s.group for s in traj.steps] == [1, 3, 5] and G == 6
    ids, fs = reasoning_tokens(traj, tok, "tays")
    assert ids[0] == eot and fs[0] == 0  # the empty step at the question, before any frame
    assert ids[-1] == tok.eos_token_id and end in ids
    calls = {}
    for i, f in zip(ids, fs):
        calls.setdefault(f, []).append(i)
    assert sorted(calls) == list(range(G + 1))
    assert calls[1] == [eot] and calls[3] == [eot]  # nothing new in groups 0 and 2
    assert tok.decode(calls[2]).strip().startswith(traj.steps[0].text) and calls[2][-1] == eot
    assert calls[G][calls[G].index(end) - 1] == eot  # the last step, then </think> answer eos
    assert reasoning_tokens(traj, tok, "interleaved") == (ids, fs)
    b_ids, b_fs = reasoning_tokens(traj, tok, "batch")
    assert set(b_fs) == {G} and b_ids.count(eot) == len(traj.steps)
    # every token sees only frame groups at or before its step's time
    lay = build_layout(traj, tok, "tays")
    for it in lay.items:
        if it[0] == "text" and it[3] > 0:
            assert lay.group_times[it[3] - 1] <= max(s.time for s in traj.steps) + 1e-9
    for st in traj.steps:
        assert lay.group_times[st.group] <= st.time + 1e-9


def _inference_logits(vlm, traj, layout) -> torch.Tensor:
    """Logits of every fed reasoning token, computed the way inference computes them."""
    frames = [f for _, f in traj.frames()]
    tp = vlm.temporal_patch_size
    out = []
    if layout.paradigm == "tays":
        with StreamingEngine(vlm, fps=2.0) as eng:
            eng.start(prompt_ids=layout.items[0][1], header_ids=[])
            for it in layout.items[1:]:
                if it[0] == "frame":
                    g = it[1]
                    eng.push_frames(frames[g * tp : (g + 1) * tp], traj.sample_times[g * tp : (g + 1) * tp])
                    assert eng.wait_idle(60)
                else:
                    assert eng.frames_ingested == it[3]
                    out.append(eng.decode_step(it[1]))  # incremental decode on the dual cache
        return torch.cat(out)
    seq = CausalSequence(vlm, 2.0)
    seq.add_text(layout.items[0][1], logits=False)
    base = None
    for it in layout.items[1:]:
        if it[0] == "frame":
            g = it[1]
            if layout.paradigm == "batch":  # one vision block (as the batch runner prefills it)
                base = seq.next_pos if base is None else base
                seq.add_frames(frames[g * tp : (g + 1) * tp], 0.0, base=base, group_index=g)
            else:
                seq.add_frames(frames[g * tp : (g + 1) * tp], 0.0)
        else:
            out.append(seq.add_text(it[1]))
    return torch.cat(out)


def _text_rows(layout, logits: torch.Tensor, tokens_per_group: int) -> torch.Tensor:
    rows, i = [], 0
    for it in layout.items:
        n = tokens_per_group if it[0] == "frame" else len(it[1])
        if it[0] == "text":
            rows.append(logits[i : i + n])
        i += n
    return torch.cat(rows)


@pytest.mark.parametrize("paradigm", PARADIGMS)
def test_training_forward_matches_inference(tiny_qwen2_5_vl, traj, paradigm):
    """Oracle: the training forward's logits at every reasoning token == the inference path's
    (TaYS: engine decode steps on the video + text caches), and so do its labels' positions."""
    vlm = tiny_qwen2_5_vl
    col = TrajectoryCollator(vlm, paradigm)
    batch = col([traj])
    with torch.no_grad():
        _, logits = StreamingLM(vlm.model)(**batch)
    layout = build_layout(traj, vlm.tokenizer, paradigm)
    got = _text_rows(layout, logits[0], 16)
    ref = _inference_logits(vlm, traj, layout)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    # the labels are the next fed token (teacher forcing) where the next token is generated
    lab = [int(x) for x in _text_rows(layout, batch["labels"][0][:, None].float(), 16)[:, 0]]
    fed = [i for it in layout.items if it[0] == "text" for i in it[1]]
    assert lab[-1] == vlm.tokenizer.eos_token_id
    assert all(lab[j] in (IGNORE, fed[j + 1]) for j in range(len(fed) - 1))
    header = len(vlm.tokenizer("<|im_start|>assistant\n<think>", add_special_tokens=False)["input_ids"])
    assert lab.count(IGNORE) == header - 1  # only inside the (fed, not generated) assistant header


@pytest.mark.parametrize("paradigm", PARADIGMS)
def test_label_weights(tiny_qwen2_5_vl, traj, paradigm):
    """Empty steps (an end-of-step opening the body or following another) and the answer (after
    </think>, with the final end) are flagged and weighed; batch traces have no empty steps, so
    with only that weight set its batches and loss stay exactly the plain mean."""
    vlm = tiny_qwen2_5_vl
    tok = vlm.tokenizer
    eot = tok.convert_tokens_to_ids("<|eot|>")
    plain = TrajectoryCollator(vlm, paradigm)([traj])
    assert "loss_weights" not in plain
    labels = plain["labels"][0]
    body, _ = reasoning_tokens(traj, tok, paradigm)
    n_empty = sum(t == eot and (j == 0 or body[j - 1] == eot) for j, t in enumerate(body))
    answer = tok(" " + traj.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    model = StreamingLM(vlm.model)
    with torch.no_grad():
        loss_plain, logits = model(**plain)
    ce = torch.nn.functional.cross_entropy(logits[0], labels, ignore_index=IGNORE, reduction="none")

    empty_only = TrajectoryCollator(vlm, paradigm, empty_step_weight=0.25)([traj])
    both = TrajectoryCollator(vlm, paradigm, empty_step_weight=0.25, answer_weight=4.0)([traj])
    if paradigm == "batch":
        assert n_empty == 0 and "loss_weights" not in empty_only
    else:
        w = empty_only["loss_weights"][0]
        assert n_empty > 0 and int((w == 0.25).sum()) == n_empty
        assert bool((labels[w == 0.25] == eot).all())
    w = both["loss_weights"][0]
    assert labels[w == 4.0].tolist() == answer  # exactly the answer and the end, in order
    assert int((w == 0.25).sum()) == n_empty
    for batch in (empty_only, both):
        with torch.no_grad():
            loss_w, _ = model(**batch)
        w = batch.get("loss_weights", torch.ones_like(labels, dtype=torch.float))[0] * (labels != IGNORE)
        torch.testing.assert_close(loss_w, (ce * w).sum() / w.sum())
        if "loss_weights" in batch:
            assert not torch.isclose(loss_w, loss_plain)
        else:
            assert torch.equal(loss_w, loss_plain)
    for bad in ({"empty_step_weight": -1.0}, {"answer_weight": -0.5}, {"answer_weight": float("nan")}):
        with pytest.raises(ValueError):
            TrajectoryCollator(vlm, paradigm, **bad)


def test_padded_batch_equals_single(tiny_qwen2_5_vl, traj):
    vlm = tiny_qwen2_5_vl
    short = build_trajectory(shapes_sample(make_stream(5, duration=5.0)), TfidfEncoder())
    col = TrajectoryCollator(vlm, "tays")
    model = StreamingLM(vlm.model)
    with torch.no_grad():
        _, both = model(**col([traj, short]))
        _, one = model(**col([short]))
        loss2, _ = model(**col([traj, short]))
    n = one.shape[1]
    torch.testing.assert_close(both[1, :n], one[0], atol=ATOL, rtol=0)
    assert torch.isfinite(loss2)
    assert col(["no_consistent_steps"]) == {"skipped": ["no_consistent_steps"]}
    assert col.skipped["no_consistent_steps"] == 1 and col([traj])["skipped"] == []


# -- the command -----------------------------------------------------------------------------------


def _train(tmp: Path, model_dir: Path, paradigm: str, *extra: str) -> Path:
    from tays.__main__ import main

    out = tmp / paradigm
    args = [
        "train",
        "--paradigm",
        paradigm,
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--duration",
        "5",
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--save-every",
        "1",
        "--save-dtype",
        "float32",
        "--lr",
        "1e-3",
        *extra,
    ]
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_qwen2_5_vl_dir):
    """A tiny TaYS checkpoint trained for 2 steps (stopped after 1 by --minutes 0, then resumed)."""
    tmp = tmp_path_factory.mktemp("tays_train")
    _train(tmp, tiny_qwen2_5_vl_dir, "tays", "--minutes", "0")
    return tmp, _train(tmp, tiny_qwen2_5_vl_dir, "tays")


@pytest.mark.slow
@pytest.mark.parametrize("paradigm", PARADIGMS)
def test_train_two_steps_resumes_and_saves(tmp_path, tiny_qwen2_5_vl_dir, trained, paradigm, capsys):
    from vstream.model import load_vlm

    if paradigm == "tays":
        tmp, out = trained
    else:
        tmp = tmp_path
        weights = ("--answer-weight", "3")
        _train(tmp, tiny_qwen2_5_vl_dir, paradigm, "--minutes", "0", *weights)  # --minutes 0: stops after 1 step
        state = json.loads((tmp / f"{paradigm}.run" / "latest" / "step.json").read_text())
        assert state["step"] == 1 and state["paradigm"] == paradigm and state["answer_weight"] == 3
        with pytest.raises(SystemExit, match="answer_weight 3.0"):  # another recipe does not resume it
            _train(tmp, tiny_qwen2_5_vl_dir, paradigm)
        capsys.readouterr()
        out = _train(tmp, tiny_qwen2_5_vl_dir, paradigm, *weights)
        assert "resuming from step 1" in capsys.readouterr().out
    meta = json.loads((out / "training.json").read_text())
    assert meta["paradigm"] == paradigm and meta["trained_steps"] == 2 and meta["split"] == "train"
    assert meta["answer_weight"] == (1 if paradigm == "tays" else 3) and meta["empty_step_weight"] == 1
    lo, hi = meta["train_seeds"]
    assert TRAIN_SEEDS.start <= lo < hi <= TRAIN_SEEDS.stop and hi <= HELDOUT_SEEDS.start
    assert meta["final_loss_ema"] is not None and meta["final_loss_ema"] == meta["final_loss_ema"]
    for f in ("model.safetensors", "config.json", "tokenizer.json", "preprocessor_config.json"):
        assert (out / f).is_file(), f
    vlm = load_vlm(str(out), device="cpu")
    assert vlm.tokenizer.convert_tokens_to_ids(END_OF_STEP) != vlm.tokenizer.unk_token_id
    # the resumed weights differ from the base model's
    base = load_vlm(str(tiny_qwen2_5_vl_dir), device="cpu")
    w, w0 = vlm.model.lm_head.weight, base.model.lm_head.weight
    assert not torch.equal(w, w0)


@pytest.mark.slow
def test_run_options_follow_the_checkpoint(trained, tiny_qwen2_5_vl_dir, tmp_path):
    import shutil

    from tays.protocol import TRAINED, run_options
    from vstream.model import load_vlm

    _, out = trained
    assert run_options(load_vlm(str(out), device="cpu")) == TRAINED  # a tays.train checkpoint
    assert run_options(load_vlm(str(tiny_qwen2_5_vl_dir), device="cpu")) == {}  # any other model: defaults
    bad = Path(shutil.copytree(out, tmp_path / "bad"))
    (bad / "training.json").write_text("{not json")
    assert run_options(load_vlm(str(bad), device="cpu")) == {}  # unreadable metadata: defaults, no crash


@pytest.mark.slow
@pytest.mark.parametrize("workers,split", [("1", "heldout"), ("2", "val")])
def test_evaluate_prints_json(trained, capsys, workers, split):
    from tays.__main__ import main

    _, out = trained
    rc = main(
        [
            "evaluate",
            "--json",
            "--n",
            "2",
            "--tays",
            str(out),
            "--batch",
            str(out),
            "--interleaved",
            str(out),
            "--duration",
            "5",
            "--speed",
            "8",
            "--warmup",
            "0",
            "--max-new-tokens",
            "24",
            "--step-tokens",
            "6",
            "--answer-tokens",
            "3",
            "--workers",
            workers,
            "--split",
            split,
        ]
    )
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for p in ("tays", "batch", "interleaved", "batch_no_think"):
        assert {"accuracy", "event_deviation_s", "ttft_s", "delay_s"} <= set(res[p]), p
        assert res[p]["n"] == 2 and 0.0 <= res[p]["accuracy"] <= 1.0
        assert res[p]["ttft_s"] is not None and res[p]["delay_s"] >= res[p]["ttft_s"]
        # records come back in stream order whichever process replayed them
        seeds = [e["seed"] for e in res[p]["examples"]]
        assert seeds == sorted(seeds) and all(split_of(s) == split for s in seeds), p
    assert res["meta"]["split"] == split and res["meta"]["workers"] == int(workers)
    assert res["meta"]["device"] == "cpu"


@pytest.mark.slow
def test_evaluate_refuses_missing_or_overlapping_checkpoints(trained, tmp_path):
    import shutil

    from tays.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--json", "--n", "1", "--tays", str(tmp_path / "nothing")])
    msg = str(e.value)
    assert msg.startswith("evaluate: no checkpoint for 'tays'") and "\n" not in msg
    _, out = trained
    bad = tmp_path / "leaky"
    shutil.copytree(out, bad)
    meta = json.loads((bad / "training.json").read_text())
    meta["train_seeds"] = [HELDOUT_SEEDS.start, HELDOUT_SEEDS.start + 10]
    (bad / "training.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--json", "--n", "1", "--paradigms", "tays", "--tays", str(bad)])
    assert "overlap the held-out split" in str(e.value)
    meta["train_seeds"] = [VAL_SEEDS.start - 5, VAL_SEEDS.start + 5]  # leaks into validation only
    (bad / "training.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--json", "--n", "1", "--split", "val", "--paradigms", "tays", "--tays", str(bad)])
    assert "overlap the validation split" in str(e.value)
    with pytest.raises(SystemExit) as e:  # a device this machine lacks: one line, before any replay
        main(["evaluate", "--json", "--n", "1", "--paradigms", "tays", "--tays", str(out), "--device", "gpu"])
    assert str(e.value).startswith("evaluate: tays: bad device 'gpu'") and "\n" not in str(e.value)


def test_eot_protocol_in_the_runner(tiny_qwen2_5_vl):
    """period_ends_step=False: steps end only at the end-of-step token or the cap."""
    from tays.paradigms import run_paradigm
    from tays.sources import ShapesSource

    r = run_paradigm(
        tiny_qwen2_5_vl,
        ShapesSource(make_stream(5, duration=5.0), realtime=True, speed=10.0),
        paradigm="tays",
        max_new_tokens=24,
        step_tokens=3,
        answer_tokens=2,
        period_ends_step=False,
        assistant_prefix="<think>",
        answer_prefix="</think>",
    )
    assert r.steps and all(s.closed_by in ("eot", "cap", "budget") for s in r.steps)


def test_shipped_weights_fit_and_the_tays_checkpoint_loads():
    from tays.protocol import TRAINED, run_options
    from vstream.model import load_vlm
    from vstream.world.assets import TAYS_MODEL_DIR
    from vstream.world.eval_model import check_heldout

    assets = Path(__file__).resolve().parents[1] / "assets"
    assert sum(p.stat().st_size for p in assets.rglob("*.safetensors")) <= 25_000_000
    meta = json.loads((TAYS_MODEL_DIR / "training.json").read_text())
    assert meta["paradigm"] == "tays" and meta["split"] == "train"
    check_heldout(TAYS_MODEL_DIR)  # trained on training seeds only
    assert run_options(load_vlm(str(TAYS_MODEL_DIR), device="cpu")) == TRAINED


def test_resume_refuses_a_run_of_another_paradigm(tmp_path):
    from vstream.world.checkpoints import resume

    class Acc:
        loaded = False

        def load_state(self, path):
            self.loaded = True

        def print(self, *a):
            pass

    (tmp_path / "step.json").write_text(json.dumps({"step": 3, "paradigm": "batch"}))
    acc = Acc()
    with pytest.raises(ValueError, match="paradigm 'batch'"):
        resume(acc, tmp_path, match={"paradigm": "tays"})
    assert not acc.loaded  # refused before any state is loaded
    assert resume(acc, tmp_path, match={"paradigm": "batch"})["step"] == 3 and acc.loaded
