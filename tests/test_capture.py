"""Attention capture (vstream.attr.capture) against eager attention, the oracle.

Capture runs inside `model.generate` on the registered `vstream_sdpa` attention; the oracle is
ONE full forward pass over prompt + generated tokens on a second copy of the model switched to
`eager` with `output_attentions=True`. Row i of the recorder must equal the eager attention of
generated token i's own position (prompt_len + i) over the image tokens, within 1e-4.

Cost (not a test): the capture adds one (H x S) score row and a softmax per layer per decode
step, never an (S x S) matrix. Measured on the demo architecture (4 layers, 6 heads, 64 image
tokens, random weights), CPU, 1 thread, 64 new tokens, next to a training job: sdpa 9-14 ms/token,
capture on 11-14 ms/token, i.e. within the run-to-run noise.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from vstream.attr import capture as C
from vstream.model import VLM, load_vlm
from vstream.world.assets import DEMO_MODEL_DIR

N_NEW = 12
ATOL = 1e-4


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _demo_dir():
    if not (DEMO_MODEL_DIR / "model.safetensors").is_file():
        pytest.skip("demo model not trained yet (assets/demo-model/model.safetensors missing)")
    return DEMO_MODEL_DIR


# Own copies (capture switches the text attention implementation; the session fixtures stay
# untouched) plus an eager copy as the oracle.
@pytest.fixture(scope="module", params=["tiny_qwen2_5_vl", "tiny_qwen3_vl", "demo"])
def pair(request) -> tuple[VLM, VLM, str]:
    if request.param == "demo":
        path = _demo_dir()
    else:
        path = request.getfixturevalue(request.param + "_dir")
    live = load_vlm(str(path), device="cpu")
    oracle = load_vlm(str(path), device="cpu")
    oracle.model.set_attn_implementation("eager")
    return live, oracle, request.param


def _inputs(vlm: VLM, name: str):
    if name == "demo":
        from vstream.world.shapes import make_scene

        scene = make_scene(3)
        return vlm.build_inputs(scene.question, image=scene.image())
    return vlm.build_inputs("What is in the image?", image=_noise(120, 100))


def _gen_config(vlm: VLM, n: int = N_NEW, cache: bool = False):
    gc = vlm.generation_kwargs(n, False, 1.0)["generation_config"]
    gc.min_new_tokens = n  # exactly n tokens, also for a trained model that would stop early
    if cache:
        gc.return_dict_in_generate = True
    return gc


def _eager_rows(oracle: VLM, inputs, seq: torch.Tensor) -> torch.Tensor:
    """(T, L, H, N) eager attention of each generated position over the image tokens."""
    p, t = inputs.prompt_len, seq.shape[1] - inputs.prompt_len
    kw = dict(inputs.model_kwargs)
    kw["input_ids"] = seq
    kw["attention_mask"] = torch.ones_like(seq)
    kw["mm_token_type_ids"] = torch.cat(
        [inputs.model_kwargs["mm_token_type_ids"], torch.zeros(1, t, dtype=torch.long)], dim=1
    )
    with oracle.lock, torch.no_grad():
        out = oracle.model(**kw, output_attentions=True)
    pos = inputs.image_token_positions
    att = torch.stack(out.attentions)  # (L, 1, H, S, S)
    return att[:, 0, :, p : p + t][..., pos].permute(2, 0, 1, 3).float()  # (T, L, H, N)


def _capture_generate(live: VLM, inputs, n: int = N_NEW):
    rec = C.AttentionRecorder.for_vlm(live, keep_cpu=True)
    with live.lock, torch.no_grad(), C.capturing(live, inputs.image_token_positions, rec):
        out = live.model.generate(**inputs.model_kwargs, generation_config=_gen_config(live, n, cache=True))
    return rec, out


def test_oracle_matches_eager(pair):
    live, oracle, name = pair
    inputs = _inputs(live, name)
    with live.lock, torch.no_grad():  # plain sdpa first, before capture is installed
        plain = live.model.generate(**inputs.model_kwargs, generation_config=_gen_config(live))

    rec, out = _capture_generate(live, inputs)
    seq = out.sequences
    # fast path kept: same tokens as plain sdpa, and the text decoder really ran on vstream_sdpa
    assert torch.equal(seq, plain)
    assert all(m.config._attn_implementation == C.ATTN_NAME for m in C.text_attention_modules(live))
    assert live.model.config.vision_config._attn_implementation == "sdpa"

    t = seq.shape[1] - inputs.prompt_len
    assert t == N_NEW
    # convention: one row per generated token that was fed back = all but the last
    assert rec.tokens == t - 1
    last = C.finalize(live, rec, inputs.image_token_positions, out.past_key_values, int(seq[0, -1]))
    assert rec.tokens == t

    l, h, n = live.num_layers, live.num_heads, inputs.image_token_positions.numel()
    got = rec.stack()
    assert got.shape == (t, l, h, n) and got.dtype == torch.float32
    assert torch.equal(rec.stack(cpu=True), got.cpu())
    assert torch.equal(last, got[-1])
    want = _eager_rows(oracle, inputs, seq)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    for i in (0, t // 2, t - 1):
        torch.testing.assert_close(rec.per_token(i), want[i], atol=ATOL, rtol=0)
    assert (want.sum(-1) <= 1 + 1e-5).all() and want.sum() > 0  # image mass is a real share

    # region features with a random one-hot assignment, per span
    g = torch.Generator().manual_seed(0)
    k = 5
    labels = torch.cat([torch.arange(k), torch.randint(0, k, (n - k,), generator=g)])
    assign = torch.nn.functional.one_hot(labels[torch.randperm(n, generator=g)], k).T.float()  # (K, N)
    for lo, hi in ((0, 4), (4, t - 1), (0, t)):
        f = C.region_features(got[lo:hi], assign)
        assert f.shape == (k, l * h)
        torch.testing.assert_close(f, C.region_features(want[lo:hi], assign), atol=ATOL, rtol=0)
        # layer-major flattening, by hand: column l*H + h
        by_hand = torch.einsum("tlhn,kn->klh", want[lo:hi], assign).reshape(k, l * h) / (hi - lo)
        torch.testing.assert_close(f, by_hand, atol=ATOL, rtol=0)
        # the live path: running sum of the recorder's rows, same features
        live_f = torch.as_tensor(C.span_features(rec, lo, hi, assign.numpy())).float()
        torch.testing.assert_close(live_f, f, atol=1e-6, rtol=0)


def test_capture_off_records_nothing(tiny_qwen2_5_vl_dir):
    live = load_vlm(str(tiny_qwen2_5_vl_dir), device="cpu")
    inputs = _inputs(live, "tiny")
    rec, _ = _capture_generate(live, inputs, n=4)
    assert rec.tokens == 3
    mods = C.text_attention_modules(live)
    assert not C.is_capturing(live)  # detached on exit
    with live.lock, torch.no_grad():  # still installed, but no recorder attached
        live.model.generate(**inputs.model_kwargs, generation_config=_gen_config(live, 4))
    assert rec.tokens == 3
    # a prefill alone (one new token) is not a decode step: nothing recorded
    rec.reset()
    assert rec.tokens == 0
    with live.lock, torch.no_grad(), C.capturing(live, inputs.image_token_positions, rec):
        live.model.generate(**inputs.model_kwargs, generation_config=_gen_config(live, 1))
    assert rec.tokens == 0
    # uninstall goes back to plain sdpa; install is idempotent
    C.uninstall(live)
    assert all(m.config._attn_implementation == "sdpa" for m in mods)
    C.install(live)
    C.install(live)
    assert all(m.config._attn_implementation == C.ATTN_NAME for m in mods)


def test_stream_in_background_thread(tiny_qwen3_vl_dir):
    """VLM.stream generates in a worker thread; a consumer reads rows while it runs."""
    live = load_vlm(str(tiny_qwen3_vl_dir), device="cpu")
    inputs = _inputs(live, "tiny")
    ref, _ = _capture_generate(live, inputs, n=8)
    rec = C.AttentionRecorder.for_vlm(live)
    seen: list[int] = []
    with C.capturing(live, inputs.image_token_positions, rec):
        for i, (_tid, _text) in enumerate(live.stream(inputs, max_new_tokens=8)):
            # token i's row arrives with the decode step that feeds it back (i + 1)
            if i >= 1:
                assert rec.wait_for(i, timeout=30)
            seen.append(rec.tokens)
    assert rec.tokens == 7 and seen[0] >= 0
    torch.testing.assert_close(rec.stack(), ref.stack(), atol=1e-6, rtol=0)


def test_recorder_threads_and_partial_steps():
    rec = C.AttentionRecorder(num_layers=3)
    got: list[int] = []
    torch.manual_seed(3)
    d, pos = 4, torch.tensor([0, 1, 2, 3])
    keys = torch.randn(1, 2, 12, d)

    def step(s: int, layers=range(3)) -> torch.Tensor:
        """Report one decode step (key length s) for `layers`; the expected (L, H, N) row."""
        row = []
        for layer in layers:
            q = torch.randn(1, 2, 1, d)
            rec.record_query(layer, q, keys[:, :, :s], None, d**-0.5, pos)
            row.append(_decode_row_mass(torch.nn.Module(), q, keys[:, :, :s], None, d**-0.5, pos))
        return torch.stack(row)

    def consumer() -> None:
        assert rec.wait_for(5, timeout=30)
        got.append(rec.tokens)

    th = threading.Thread(target=consumer)
    th.start()
    rows = [step(5 + s) for s in range(5)]
    th.join(timeout=30)
    assert got == [5]
    torch.testing.assert_close(torch.as_tensor(rec.per_token(4)).float(), rows[4], atol=1e-6, rtol=0)
    # an interrupted step (layers 0, 1 only) is dropped when the next step starts
    step(10, layers=(0, 1))
    last = step(11)
    assert rec.tokens == 6
    torch.testing.assert_close(torch.as_tensor(rec.per_token(5)).float(), last, atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        rec.record_query(3, torch.zeros(1, 2, 1, d), keys, None, 1.0, pos)
    rec.reset()
    assert rec.tokens == 0 and not rec.wait_for(1, timeout=0.01)


def test_export_mid_step_copies_what_the_steps_read():
    """`export` while the generation thread is half-way through the next step (layer 0's cache
    a column longer than layer 1's): it still exports, the keys the steps read, and the rows
    computed from the buffers (as the attribution process does) equal the recorder's own."""
    from vstream.attr import rowmath

    nl, h, hkv, d, pos = 2, 4, 2, 8, torch.tensor([0, 2, 3])
    rec = C.AttentionRecorder(num_layers=nl)
    torch.manual_seed(5)
    cache = torch.randn(nl, 1, hkv, 12, d)
    for s in (6, 7):  # two complete decode steps
        for layer in range(nl):
            rec.record_query(layer, torch.randn(1, h, 1, d), cache[layer, :, :, :s], None, d**-0.5, pos)
    rec.record_query(0, torch.randn(1, h, 1, d), cache[0, :, :, :8], None, d**-0.5, pos)  # next step, layer 0 only
    queries = np.zeros((4, nl, h, d), np.float32)
    keys = np.full((nl, hkv, 12, d), np.nan, np.float32)
    lens, s, scaling = rec.export(0, 2, queries, keys, 0)
    assert lens == [6, 7] and s == 7
    np.testing.assert_array_equal(keys[:, :, :7], cache[:, 0, :, :7].numpy())
    assert np.isnan(keys[:, :, 7:]).all()  # nothing past what the steps read
    rows = rowmath.image_mass(rowmath.decode_scores(queries[:2], keys, np.asarray(lens), scaling), pos.numpy())
    np.testing.assert_allclose(rows, rec.stack(0, 2).numpy(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 3), (8, 1)])
@pytest.mark.parametrize("mask", ["none", "bool", "float"])
def test_decode_row_matches_eager_kernel(heads, kv_heads, mask):
    """GQA pairing and mask handling of the single-row computation vs transformers' eager."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        eager_attention_forward,
    )

    torch.manual_seed(heads * 10 + kv_heads)
    d, s = 16, 23
    mod = torch.nn.Module()
    mod.num_key_value_groups, mod.training = heads // kv_heads, False
    q, k, v = torch.randn(1, heads, 1, d), torch.randn(1, kv_heads, s, d), torch.randn(1, kv_heads, s, d)
    keep = torch.rand(1, 1, 1, s) > 0.3
    keep[..., -1] = True
    bool_mask = None if mask == "none" else keep
    float_mask = None if mask == "none" else torch.zeros(1, 1, 1, s).masked_fill(~keep, torch.finfo(torch.float32).min)
    _, w = eager_attention_forward(mod, q, k, v, float_mask, scaling=d**-0.5)
    pos = torch.tensor([0, 3, 4, 5, 10, 22])
    row = _decode_row_mass(mod, q, k, bool_mask if mask == "bool" else float_mask, d**-0.5, pos)
    torch.testing.assert_close(row, w[0, :, 0][:, pos], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kv_heads", [(2, 2), (2, 1)])  # uniform layers (one batched matmul) or not
@pytest.mark.parametrize("mask", ["none", "bool", "float"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # numpy path, torch path
def test_deferred_rows_match_single_row_kernel(kv_heads, mask, dtype):
    """The recorder's lazy, batched rows equal the per-step computation on each step's own keys."""
    torch.manual_seed(7)
    torch.set_default_dtype(dtype)
    try:
        _deferred_rows_case(kv_heads, mask, numpy_rows=dtype == torch.float32)
    finally:
        torch.set_default_dtype(torch.float32)


def _deferred_rows_case(kv_heads, mask, numpy_rows):
    heads, d, s_final, pos = 4, 8, 20, torch.tensor([0, 2, 5, 9])
    keys = [torch.randn(1, hkv, s_final, d) for hkv in kv_heads]
    mod = torch.nn.Module()
    rec = C.AttentionRecorder(num_layers=2)
    expected = []
    for s in (15, 16, 17):  # three decode steps; the cache grows by one key per step
        row = []
        keep = torch.rand(1, 1, 1, s) > 0.3
        keep[..., -1] = True
        m = (
            None
            if mask == "none"
            else keep
            if mask == "bool"
            else (torch.zeros(1, 1, 1, s).masked_fill(~keep, torch.finfo(torch.float32).min))
        )
        for li, k in enumerate(keys):
            q = torch.randn(1, heads, 1, d)
            row.append(_decode_row_mass(mod, q, k[:, :, :s], m, d**-0.5, pos))
            rec.record_query(li, q, k[:, :, :s], m, d**-0.5, pos)
        expected.append(torch.stack(row))
    expected = torch.stack(expected).float()
    torch.testing.assert_close(rec.stack(0, 3).float(), expected, atol=1e-6, rtol=0)
    assert isinstance(rec.row_sum(0, 3), np.ndarray) == numpy_rows
    torch.testing.assert_close(torch.as_tensor(rec.row_sum(1, 3)).float(), expected[1:].sum(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(rec.per_token(2).float(), expected[2], atol=1e-6, rtol=0)


def test_region_features_and_running_sum_shapes():
    g = torch.Generator().manual_seed(1)
    att = torch.rand(7, 3, 2, 10, generator=g)
    soft = torch.rand(4, 10, generator=g)
    f = C.region_features(att, soft)
    assert f.shape == (4, 6)
    torch.testing.assert_close(f[2, 1 * 2 + 1], (att[:, 1, 1] @ soft[2]).mean())
    # a running sum in pieces (torch or numpy) gives the same features
    total = att[:3].sum(0) + att[3] + att[4:].sum(0)
    torch.testing.assert_close(C.features_from_sum(total, 7, soft), f)
    np.testing.assert_allclose(C.features_from_sum(total.numpy(), 7, soft.numpy()), f.numpy(), atol=1e-6)
    with pytest.raises(ValueError):
        C.region_features(att[:0], soft)
    with pytest.raises(ValueError):
        C.region_features(att, soft[:, :9])
    with pytest.raises(ValueError):
        C.features_from_sum(total, 0, soft)


def test_capturing_guards(tiny_qwen2_5_vl_dir):
    live = load_vlm(str(tiny_qwen2_5_vl_dir), device="cpu")
    pos = torch.arange(3)
    with pytest.raises(ValueError):
        with C.capturing(live, pos, C.AttentionRecorder(live.num_layers + 1)):
            pass
    with pytest.raises(ValueError):
        with C.capturing(live, pos[:0], C.AttentionRecorder.for_vlm(live)):
            pass
    with C.capturing(live, pos, C.AttentionRecorder.for_vlm(live)):
        with pytest.raises(RuntimeError):
            with C.capturing(live, pos, C.AttentionRecorder.for_vlm(live)):
                pass
    assert not C.is_capturing(live)


def _decode_row_mass(module, query, key, attention_mask, scaling, positions) -> torch.Tensor:
    """Reference for one decode step's row: softmax attention of the single query (batch row 0)
    over all keys, per head, as eager attention computes it (scores in the model dtype, softmax
    in float32), restricted to `positions`: (H, N). GQA groups query heads per kv head, the
    same pairing as `repeat_kv`. Itself checked against transformers' eager kernel below."""
    q = query[0, :, 0, :]  # (H, D)
    k = key[0]  # (Hkv, S, D)
    h, d = q.shape
    hkv, s, _ = k.shape
    scores = torch.matmul(q.reshape(hkv, h // hkv, d), k.transpose(1, 2)) * scaling  # (Hkv, G, S)
    scores = scores.reshape(h, s).float()
    if attention_mask is not None:
        m = attention_mask[0, :, -1, :s]  # (1 or H, S)
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
    return torch.softmax(scores, dim=-1).index_select(1, positions)
