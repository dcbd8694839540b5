"""An estimator per model: identity with a weights fingerprint, `--estimators DIR` lookup."""

from __future__ import annotations

import shutil

import pytest
import torch

from vstream.attr.estimator import LinearEstimator
from vstream.attr.estimator_lookup import find_estimator
from vstream.cli import evaluate as evaluate_cli
from vstream.model import load_vlm, model_identity
from vstream.model.identity import weights_fingerprint


@pytest.fixture(scope="module")
def vlm(tiny_qwen2_5_vl_dir):
    return load_vlm(str(tiny_qwen2_5_vl_dir), device="cpu")


def test_identity_records_sizes_and_weights(vlm, tiny_qwen2_5_vl_dir, tmp_path):
    ident = model_identity(vlm)
    assert ident["model_type"] == "qwen2_5_vl" and ident["num_layers"] == 2 and ident["num_heads"] == 4
    assert ident["hidden_size"] == 64 and ident["vocab_size"] == len(vlm.tokenizer)
    assert len(ident["weights"]) == 16
    again = load_vlm(str(tiny_qwen2_5_vl_dir), device="cpu")
    assert weights_fingerprint(again) == ident["weights"]  # same checkpoint, same fingerprint
    # a fine-tune of the same architecture (one output-head row changed) is told apart
    copy = tmp_path / "tuned"
    shutil.copytree(tiny_qwen2_5_vl_dir, copy)
    tuned = load_vlm(str(copy), device="cpu")
    with torch.no_grad():
        tuned.model.get_output_embeddings().weight[0, 0] += 1.0
    tuned.model.save_pretrained(copy)
    assert weights_fingerprint(load_vlm(str(copy), device="cpu")) != ident["weights"]


def _est(ident: dict, **over) -> LinearEstimator:
    meta = {**ident, **over}
    return LinearEstimator(int(meta.pop("num_layers")), int(meta.pop("num_heads")), meta)


def test_lookup_picks_the_estimator_made_for_these_weights(vlm, tmp_path):
    ident = model_identity(vlm)
    _est(ident, model="someone/other-vl", weights="0" * 16).save(tmp_path / "a-other.safetensors")
    _est(ident, num_layers=3).save(tmp_path / "b-deeper.safetensors")
    legacy = {k: v for k, v in ident.items() if k != "weights"}
    _est(legacy).save(tmp_path / "c-legacy.safetensors")
    _est(ident).save(tmp_path / "d-mine.safetensors")
    (tmp_path / "e-broken.safetensors").write_bytes(b"not safetensors")
    found = find_estimator(vlm, tmp_path)
    assert found.path.name == "d-mine.safetensors" and "these weights" in found.note
    why = dict(found.considered)
    assert "another model" in why["a-other.safetensors"] and "3 layers" in why["b-deeper.safetensors"]
    assert "no weights fingerprint" in why["c-legacy.safetensors"] and "not usable" in why["e-broken.safetensors"]
    (tmp_path / "d-mine.safetensors").unlink()
    assert find_estimator(vlm, tmp_path).path.name == "c-legacy.safetensors"  # same name and sizes


def test_none_fits_says_so_with_the_commands(vlm, tmp_path, tiny_qwen2_5_vl_dir, capsys):
    _est(model_identity(vlm), weights="f" * 16).save(tmp_path / "stale.safetensors")  # other weights
    found = find_estimator(vlm, tmp_path, str(tiny_qwen2_5_vl_dir))
    assert found.estimator is None and "other weights" in dict(found.considered)["stale.safetensors"]
    assert "no estimator in" in found.note and "1 estimator file(s)" in found.note
    assert f"python -m vstream collect --model {tiny_qwen2_5_vl_dir} --data YOUR_ROWS.jsonl" in found.note
    assert "python -m vstream train-estimator --labels runs/labels-" in found.note and str(tmp_path) in found.note
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no estimator files there" in find_estimator(vlm, empty).note
    # the command line says the same and stops before any work
    rc = evaluate_cli.main(["--model", str(tiny_qwen2_5_vl_dir), "--estimators", str(tmp_path), "--data", "x.jsonl"])
    err = capsys.readouterr().err
    assert rc == 2 and "data path does not exist" in err
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"image": "nope.png", "question": "q"}\n{"image": "x.png", "question": "q"}\n')
    (tmp_path / "x.png").write_bytes(b"")
    rc = evaluate_cli.main(["--model", str(tiny_qwen2_5_vl_dir), "--estimators", str(tmp_path), "--data", str(rows)])
    err = capsys.readouterr().err
    assert rc == 2 and "no estimator in" in err and "python -m vstream train-estimator" in err


def test_the_explorer_uses_the_fitting_estimator_or_says_how_to_train_one(vlm, tmp_path, monkeypatch):
    from ui import explorer

    monkeypatch.setattr(explorer, "ESTIMATORS_DIR", tmp_path)
    est, note = explorer.estimator_for(vlm, "tiny", None)
    assert type(est).__name__ == "RawAttention"
    assert "no estimator in" in note and "python -m vstream collect --model tiny --data" in note
    assert note.endswith("until then scores are raw attention")
    _est(model_identity(vlm)).save(tmp_path / "mine.safetensors")
    est, note = explorer.estimator_for(vlm, "tiny", None)
    assert isinstance(est, LinearEstimator)
    assert note == f"estimator: mine.safetensors, trained for these weights ({model_identity(vlm)['weights']})"
