"""The VLM adapter on tiny random Qwen2.5-VL / Qwen3-VL folders (CPU, a few seconds)."""

from __future__ import annotations

import io
import json
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vstream.model import VLM, IncrementalDecoder, VLMError, load_vlm, normalize_image

ARCHS = ["tiny_qwen2_5_vl", "tiny_qwen3_vl"]


@pytest.fixture(params=ARCHS)
def vlm(request) -> VLM:
    return request.getfixturevalue(request.param)


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _generate_ref(vlm: VLM, inputs, n: int) -> list[int]:
    with torch.no_grad():
        out = vlm.model.generate(**inputs.model_kwargs, max_new_tokens=n, do_sample=False)
    return out[0, inputs.prompt_len :].tolist()


def _gen_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "vstream-generate"]


# -- loading -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture,arch,ppt", [("tiny_qwen2_5_vl", "qwen2_5_vl", 28), ("tiny_qwen3_vl", "qwen3_vl", 32)])
def test_load_round_trip(request, fixture, arch, ppt):
    vlm = request.getfixturevalue(fixture)
    assert vlm.arch == arch
    assert vlm.device == torch.device("cpu") and vlm.dtype == torch.float32
    assert next(vlm.model.parameters()).dtype == torch.float32
    assert vlm.pixels_per_token == ppt and vlm.merge_size == 2
    assert (vlm.num_layers, vlm.num_heads) == (2, 4)
    assert not vlm.model.training
    assert vlm.model.config._attn_implementation == "sdpa"
    assert vlm.eos_token_ids == [vlm.tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_concurrent_loads_do_not_corrupt_each_other():
    """The explorer warms one model while a tab loads another; both must come out whole."""
    root = Path(__file__).resolve().parents[1]
    paths = [str(root / "assets" / "demo-model"), str(root / "assets" / "tays-model")] * 3
    results: dict[int, object] = {}

    def load(i: int) -> None:
        try:
            results[i] = load_vlm(paths[i])
        except Exception as e:  # noqa: BLE001 - the test reports whatever went wrong
            results[i] = e

    threads = [threading.Thread(target=load, args=(i,)) for i in range(len(paths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, got in results.items():
        assert isinstance(got, VLM), f"load {i} of {paths[i]} failed: {got!r}"
        assert not any(p.is_meta for p in got.model.parameters())
    assert len(results) == len(paths)


# -- inputs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(112, 112), (150, 100), (97, 203), (1, 1), (3000, 2000)])
def test_image_tokens_and_boxes(vlm, size):
    w, h = size
    img = _noise(w, h)
    inp = vlm.build_inputs("What is in the image?", image=img, system="Be brief.")
    kw = inp.model_kwargs
    t, gh, gw = kw["image_grid_thw"][0].tolist()
    n = t * gh * gw // vlm.merge_size**2
    ids = kw["input_ids"][0]
    pos = (ids == vlm.image_token_id).nonzero().flatten()
    assert len(inp.image_token_positions) == n
    assert torch.equal(inp.image_token_positions, pos)
    assert torch.equal(pos, torch.arange(pos[0], pos[0] + n))  # one contiguous block
    assert ids[pos[0] - 1] == vlm.model.config.vision_start_token_id
    assert ids[pos[-1] + 1] == vlm.model.config.vision_end_token_id
    mm = kw["mm_token_type_ids"][0]
    assert torch.equal((mm == 1).nonzero().flatten(), pos) and int(mm.sum()) == n
    assert kw["pixel_values"].shape[0] == t * gh * gw
    th, tw = inp.token_grid
    assert th * tw == n and (gh, gw) == (th * vlm.merge_size, tw * vlm.merge_size)
    assert inp.resized_size == (tw * vlm.pixels_per_token, th * vlm.pixels_per_token)
    assert inp.original_size == (w, h) and inp.image.mode == "RGB"

    boxes = inp.token_boxes
    assert boxes.shape == (n, 4)
    assert torch.allclose(boxes[0, :2], torch.zeros(2))
    assert torch.allclose(boxes[-1, 2:], torch.tensor([float(w), float(h)]))
    grid = boxes.view(th, tw, 4)
    assert torch.allclose(grid[:, 1:, 0], grid[:, :-1, 2])  # rows tile left to right
    assert torch.allclose(grid[1:, :, 1], grid[:-1, :, 3])  # columns tile top to bottom
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sum()
    assert torch.isclose(area, torch.tensor(float(w * h)), rtol=1e-4)


def test_processor_sizes_respected(tiny_qwen2_5_vl, tiny_qwen3_vl):
    """min_pixels = max_pixels from the saved preprocessor config: square inputs give 4x4 tokens.
    (Sizes chosen so smart_resize's floating point lands exactly: 300 px gives 3x3 on Qwen2.5.)"""
    assert tiny_qwen2_5_vl.build_inputs("q", image=_noise(224, 224)).token_grid == (4, 4)
    assert tiny_qwen2_5_vl.build_inputs("q", image=_noise(224, 224)).resized_size == (112, 112)
    assert tiny_qwen3_vl.build_inputs("q", image=_noise(256, 256)).token_grid == (4, 4)
    assert tiny_qwen3_vl.build_inputs("q", image=_noise(256, 256)).resized_size == (128, 128)


def test_text_only_and_prefix(vlm):
    inp = vlm.build_inputs("Hello?", assistant_prefix="<think>\n")
    assert len(inp.image_token_positions) == 0 and inp.token_grid is None
    assert "pixel_values" not in inp.model_kwargs
    assert inp.prompt.endswith("<|im_start|>assistant\n<think>\n")
    assert inp.input_ids[0, -2].item() == vlm.tokenizer.convert_tokens_to_ids("<think>")
    with torch.no_grad():
        assert vlm.model(**inp.model_kwargs).logits.shape[1] == inp.prompt_len


def test_placeholder_injection_refused(vlm):
    with pytest.raises(VLMError, match="placeholder"):
        vlm.build_inputs("sneaky <|image_pad|>", image=_noise(50, 50))


def test_forward_runs(vlm):
    inp = vlm.build_inputs("What is in the image?", image=_noise(150, 100))
    with torch.no_grad():
        logits = vlm.model(**inp.model_kwargs).logits
    assert logits.shape == (1, inp.prompt_len, len(vlm.tokenizer))
    assert torch.isfinite(logits).all()


def test_mm_token_type_ids_drive_mrope(tiny_qwen2_5_vl, tiny_qwen3_vl):
    """transformers 5.x quirk: without mm_token_type_ids Qwen2.5-VL silently uses 1-D
    positions (different logits) and Qwen3-VL refuses; build_inputs must pass them."""
    vlm = tiny_qwen2_5_vl
    inp = vlm.build_inputs("What is in the image?", image=_noise(150, 100))
    kw = dict(inp.model_kwargs)
    with torch.no_grad():
        with_mm = vlm.model(**kw).logits
        kw.pop("mm_token_type_ids")
        without = vlm.model(**kw).logits
    assert not torch.allclose(with_mm[0, -1], without[0, -1])
    # image tokens get 2-D (row, col) positions
    pos, _ = vlm.model.model.get_rope_index(
        inp.input_ids,
        mm_token_type_ids=inp.model_kwargs["mm_token_type_ids"],
        image_grid_thw=inp.model_kwargs["image_grid_thw"],
    )
    img = pos[:, 0, inp.image_token_positions]
    th, tw = inp.token_grid
    assert torch.equal(img[1] - img[1, 0], torch.arange(th).repeat_interleave(tw))
    assert torch.equal(img[2] - img[2, 0], torch.arange(tw).repeat(th))

    inp3 = tiny_qwen3_vl.build_inputs("q", image=_noise(64, 64))
    kw3 = {k: v for k, v in inp3.model_kwargs.items() if k != "mm_token_type_ids"}
    with pytest.raises(ValueError, match="mm_token_type_ids"), torch.no_grad():
        tiny_qwen3_vl.model(**kw3)


# -- generation ----------------------------------------------------------------------------------


def test_stream_matches_greedy_generate(vlm):
    inp = vlm.build_inputs("What is in the image?", image=_noise(150, 100))
    ref = _generate_ref(vlm, inp, 12)
    before = threading.active_count()
    got = list(vlm.stream(inp, max_new_tokens=12))
    assert [t for t, _ in got] == ref and len(ref) == 12
    text = vlm.tokenizer.decode(ref, skip_special_tokens=False)
    assert text.startswith("".join(p for _, p in got))
    assert vlm.generate_text(inp, max_new_tokens=12) == text
    assert threading.active_count() == before and not _gen_threads()


def test_stream_video_and_text_only(vlm):
    frames = [_noise(90, 70, seed=i) for i in range(4)]
    inp = vlm.build_inputs("Describe the video.", video=frames)
    assert [t for t, _ in vlm.stream(inp, max_new_tokens=5)] == _generate_ref(vlm, inp, 5)
    inp = vlm.build_inputs("Hello?")
    assert [t for t, _ in vlm.stream(inp, max_new_tokens=5)] == _generate_ref(vlm, inp, 5)


def test_sampling_runs(tiny_qwen2_5_vl):
    inp = tiny_qwen2_5_vl.build_inputs("Hello?")
    torch.manual_seed(0)
    out = list(tiny_qwen2_5_vl.stream(inp, max_new_tokens=4, do_sample=True, temperature=0.7))
    assert len(out) == 4


def test_eos_stops_and_is_not_yielded(tiny_qwen2_5_vl, monkeypatch):
    vlm = tiny_qwen2_5_vl
    inp = vlm.build_inputs("What is in the image?", image=_noise(150, 100))
    ref = _generate_ref(vlm, inp, 10)
    stop_tok = ref[4]
    expect = ref[: ref.index(stop_tok)]
    monkeypatch.setattr(vlm.model.generation_config, "eos_token_id", [vlm.eos_token_ids[0], stop_tok])
    assert [t for t, _ in vlm.stream(inp, max_new_tokens=10)] == expect
    assert vlm.generate_text(inp, max_new_tokens=10) == vlm.tokenizer.decode(expect, skip_special_tokens=False)


def test_stop_event_stops_early(vlm):
    inp = vlm.build_inputs("What is in the image?", image=_noise(150, 100))
    before = threading.active_count()
    ev = threading.Event()
    got = []
    for tid, _ in vlm.stream(inp, max_new_tokens=60, stop_event=ev):
        got.append(tid)
        if len(got) == 3:
            ev.set()
    assert len(got) == 3  # tokens made ahead of the consumer are not yielded after the stop
    assert threading.active_count() == before and not _gen_threads()
    assert list(vlm.stream(inp, max_new_tokens=5, stop_event=ev)) == []  # already set: nothing


def test_closing_generator_joins_thread(vlm):
    inp = vlm.build_inputs("What is in the image?", image=_noise(150, 100))
    before = threading.active_count()
    gen = vlm.stream(inp, max_new_tokens=200)
    next(gen)
    next(gen)
    assert _gen_threads()  # still generating in the background
    gen.close()
    assert threading.active_count() == before and not _gen_threads()


def test_generation_error_reaches_consumer(tiny_qwen2_5_vl):
    inp = tiny_qwen2_5_vl.build_inputs("q", image=_noise(64, 64))
    bad = type(inp)(**{**inp.__dict__, "model_kwargs": {**inp.model_kwargs}})
    bad.model_kwargs["pixel_values"] = bad.model_kwargs["pixel_values"][:4]  # feature count mismatch
    with pytest.raises(Exception):
        list(tiny_qwen2_5_vl.stream(bad, max_new_tokens=3))
    assert not _gen_threads()


def test_incremental_decoder_keeps_multibyte_characters(tiny_tokenizer):
    text = "naïve café: 日本語 🙂 ok"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # byte-level pieces split the characters
    dec = IncrementalDecoder(tiny_tokenizer)
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stream_text_pieces_with_scripted_model(tiny_qwen2_5_vl, tiny_tokenizer):
    """stream() plumbing with a model that emits a known multi-byte answer then eos."""
    from transformers import GenerationConfig

    text = "<think> 日本語 🙂 </think> café"
    script = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")

    class Scripted:
        generation_config = GenerationConfig(eos_token_id=eos)

        def generate(self, input_ids, streamer, stopping_criteria, generation_config, **kw):
            streamer.put(input_ids)
            seq = input_ids
            for tid in script + [eos]:
                seq = torch.cat([seq, torch.tensor([[tid]])], dim=1)
                streamer.put(torch.tensor([tid]))
                if stopping_criteria(seq, None).all():
                    break
            streamer.end()

    fake = VLM(
        model=Scripted(),
        tokenizer=tiny_tokenizer,
        image_processor=tiny_qwen2_5_vl.image_processor,
        arch="qwen2_5_vl",
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    inp = tiny_qwen2_5_vl.build_inputs("q")
    got = list(fake.stream(inp))
    assert [t for t, _ in got] == script
    assert "".join(p for _, p in got) == text
    assert not any("\ufffd" in p for _, p in got)


# -- video ---------------------------------------------------------------------------------------


def _reference_video_patches(vlm: VLM, frames: list[Image.Image]) -> torch.Tensor:
    """transformers' Qwen2VLVideoProcessor.patchify (torch), fed with the image processor's
    resize/rescale/normalize: what our torchvision-free path must reproduce."""
    ip = vlm.image_processor
    arrs = []
    for f in frames:
        a = np.asarray(f, dtype=np.float32).transpose(2, 0, 1)
        a = ip.resize(a, size=ip.size, resample=ip.resample, factor=vlm.pixels_per_token)
        a = ip.normalize(ip.rescale(a, ip.rescale_factor), ip.image_mean, ip.image_std)
        arrs.append(torch.from_numpy(np.asarray(a, dtype=np.float32)))
    videos = torch.stack(arrs)[None]  # (1, T, C, H, W)
    tp, p, m = vlm.temporal_patch_size, vlm.patch_size, vlm.merge_size
    if pad := -videos.shape[1] % tp:
        videos = torch.cat((videos, videos[:, -1:].expand(-1, pad, -1, -1, -1)), dim=1)
    b, t, c, h, w = videos.shape
    gt, gh, gw = t // tp, h // p, w // p
    x = videos.reshape(b, gt, tp, c, gh // m, m, p, gw // m, m, p).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return x.reshape(b * gt * gh * gw, c * tp * p * p)


def test_video_qwen2_5_vl(tiny_qwen2_5_vl):
    vlm = tiny_qwen2_5_vl
    frames = [_noise(150, 100, seed=i) for i in range(4)]
    inp = vlm.build_inputs("Describe the video.", video=frames, fps=4.0)
    kw = inp.model_kwargs
    g, gh, gw = kw["video_grid_thw"][0].tolist()
    assert g == 2 and inp.video_grid == (2, gh // 2, gw // 2)
    n = g * gh * gw // 4
    assert torch.equal(inp.video_token_positions, (kw["input_ids"][0] == vlm.video_token_id).nonzero().flatten())
    assert len(inp.video_token_positions) == n
    assert torch.equal((kw["mm_token_type_ids"][0] == 2).nonzero().flatten(), inp.video_token_positions)
    assert inp.video_frame_groups.tolist() == [0] * (n // 2) + [1] * (n // 2)
    assert torch.allclose(kw["second_per_grid_ts"], torch.tensor([0.5]))
    assert inp.video_token_boxes.shape == (n, 4)
    assert torch.allclose(inp.video_token_boxes[-1, 2:], torch.tensor([150.0, 100.0]))
    assert torch.allclose(kw["pixel_values_videos"], _reference_video_patches(vlm, inp.frames), atol=1e-5)
    with torch.no_grad():
        logits = vlm.model(**kw).logits
    assert logits.shape[1] == inp.prompt_len and torch.isfinite(logits).all()


def test_video_odd_frames_pad_last(tiny_qwen2_5_vl):
    frames = [_noise(64, 64, seed=i) for i in range(3)]
    inp = tiny_qwen2_5_vl.build_inputs("q", video=frames)
    assert inp.video_grid[0] == 2
    assert torch.allclose(
        inp.model_kwargs["pixel_values_videos"], _reference_video_patches(tiny_qwen2_5_vl, inp.frames)
    )


def test_video_frame_pair_equals_image_path(vlm):
    """A still image is a 2-frame video of itself: same patches, same token count."""
    img = _noise(150, 100)
    as_image = vlm.build_inputs("q", image=img).model_kwargs
    as_video = vlm.build_inputs("q", video=[img, img]).model_kwargs
    assert torch.equal(as_video["video_grid_thw"], as_image["image_grid_thw"])
    assert torch.allclose(as_video["pixel_values_videos"], as_image["pixel_values"])
    assert int((as_video["mm_token_type_ids"] == 2).sum()) == int((as_image["mm_token_type_ids"] == 1).sum())


def test_video_qwen3_vl_timestamps(tiny_qwen3_vl):
    vlm = tiny_qwen3_vl
    frames = [_noise(128, 128, seed=i) for i in range(4)]
    inp = vlm.build_inputs("Describe the video.", video=frames, fps=2.0)
    ids = inp.input_ids[0]
    assert inp.video_grid == (2, 4, 4) and inp.video_timestamps == [0.25, 1.25]
    assert "second_per_grid_ts" not in inp.model_kwargs
    pos = inp.video_token_positions
    assert len(pos) == 32
    a, b = pos[:16], pos[16:]
    assert torch.equal(a, torch.arange(a[0], a[0] + 16)) and torch.equal(b, torch.arange(b[0], b[0] + 16))
    between = vlm.tokenizer.decode(ids[a[-1] + 1 : b[0]])
    assert between == "<|vision_end|><1.2 seconds><|vision_start|>"  # f"{1.25:.1f}" rounds half to even
    with torch.no_grad():
        assert torch.isfinite(vlm.model(**inp.model_kwargs).logits).all()


def test_video_bad_inputs(tiny_qwen2_5_vl):
    with pytest.raises(VLMError, match="same size"):
        tiny_qwen2_5_vl.build_inputs("q", video=[_noise(64, 64), _noise(80, 64)])
    with pytest.raises(VLMError, match="frame 1"):
        tiny_qwen2_5_vl.build_inputs("q", video=[_noise(64, 64), b"junk"])
    with pytest.raises(VLMError):
        tiny_qwen2_5_vl.build_inputs("q", video=[])


# -- load errors ---------------------------------------------------------------------------------


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


def test_missing_path(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(VLMError) as err:
        load_vlm(str(missing))
    assert str(missing) in _one_line(err)


def test_hub_id_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(VLMError) as err:
        load_vlm("someone/not-a-model")
    msg = _one_line(err)
    assert "someone/not-a-model" in msg and "local path" in msg


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(VLMError) as err:
        load_vlm(str(tmp_path))
    msg = _one_line(err)
    assert "bert" in msg and "qwen2_5_vl" in msg and "qwen3_vl" in msg


def test_pickle_weights_refused(tmp_path, tiny_qwen2_5_vl_dir):
    (tmp_path / "config.json").write_text((tiny_qwen2_5_vl_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(VLMError) as err:
        load_vlm(str(tmp_path))
    msg = _one_line(err)
    assert "safetensors" in msg and "pytorch_model.bin" in msg


def test_not_a_model_folder(tmp_path):
    with pytest.raises(VLMError) as err:
        load_vlm(str(tmp_path))
    assert "config.json" in _one_line(err)


REAL_PREPROCESSOR = {
    # as shipped with Qwen/Qwen2.5-VL-7B-Instruct (legacy min/max_pixels keys)
    "tiny_qwen2_5_vl_dir": {
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
    },
    # as shipped with Qwen/Qwen3-VL-*: size dict, patch 16, fast processor type
    "tiny_qwen3_vl_dir": {
        "size": {"longest_edge": 16777216, "shortest_edge": 65536},
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "processor_class": "Qwen3VLProcessor",
        "image_processor_type": "Qwen2VLImageProcessorFast",
    },
}


@pytest.mark.parametrize(
    "fixture,ppt,grid", [("tiny_qwen2_5_vl_dir", 28, (17, 23)), ("tiny_qwen3_vl_dir", 32, (15, 20))]
)
def test_real_preprocessor_configs(request, tmp_path, fixture, ppt, grid):
    import shutil

    src = request.getfixturevalue(fixture)
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    (dst / "preprocessor_config.json").write_text(json.dumps(REAL_PREPROCESSOR[fixture]))
    vlm = load_vlm(str(dst), device="cpu")
    assert vlm.pixels_per_token == ppt
    inp = vlm.build_inputs("q", image=_noise(640, 480))
    assert inp.token_grid == grid and inp.resized_size == (grid[1] * ppt, grid[0] * ppt)


def test_processor_model_mismatch_refused(tmp_path, tiny_qwen2_5_vl_dir):
    import shutil

    dst = tmp_path / "model"
    shutil.copytree(tiny_qwen2_5_vl_dir, dst)
    (dst / "preprocessor_config.json").write_text(json.dumps({"patch_size": 16}))
    with pytest.raises(VLMError, match="patch_size") as err:
        load_vlm(str(dst), device="cpu")
    _one_line(err)


def test_bad_dtype_and_device(tiny_qwen2_5_vl_dir):
    with pytest.raises(VLMError):
        load_vlm(str(tiny_qwen2_5_vl_dir), dtype="int3")
    with pytest.raises(VLMError):
        load_vlm(str(tiny_qwen2_5_vl_dir), device="nonsense")


def test_bad_image_in_build_inputs(tiny_qwen2_5_vl):
    with pytest.raises(VLMError) as err:
        tiny_qwen2_5_vl.build_inputs("q", image=b"\x89PNG\r\n\x1a\nbroken")
    _one_line(err)


# -- images --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "PA", "L", "1", "I;16", "I", "F", "CMYK", "YCbCr", "RGB"])
def test_normalize_modes(mode):
    out = normalize_image(Image.new(mode, (40, 30)))
    assert out.mode == "RGB" and out.size == (40, 30)


def test_normalize_values():
    assert normalize_image(Image.new("RGBA", (40, 30), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert normalize_image(Image.new("LA", (40, 30), (0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert normalize_image(Image.new("RGBA", (40, 30), (255, 0, 0, 255))).getpixel((0, 0)) == (255, 0, 0)
    assert normalize_image(Image.new("I;16", (40, 30), 65535)).getpixel((0, 0)) == (255, 255, 255)
    assert normalize_image(Image.new("I", (40, 30), 65535)).getpixel((0, 0)) == (255, 255, 255)
    assert normalize_image(Image.new("F", (40, 30), 0.5)).getpixel((0, 0)) == (128, 128, 128)
    assert normalize_image(Image.new("CMYK", (40, 30), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (40, 30), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.info["transparency"] = 0
    assert normalize_image(pal).getpixel((0, 0)) == (255, 255, 255)
    src = Image.new("RGB", (40, 30), (1, 2, 3))
    out = normalize_image(src)
    assert out is not src and out.getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize(
    "size,expect",
    [
        ((1, 1), (28, 28)),
        ((10, 20), (28, 56)),
        ((8000, 8000), (2048, 2048)),
        ((20, 1000), (28, 1400)),
        ((4096, 100), (2048, 50)),
        ((3000, 2000), (2048, 1365)),
    ],
)
def test_normalize_sizes(size, expect):
    assert normalize_image(Image.new("RGB", size)).size == expect


@pytest.mark.parametrize("size", [(3000, 20), (20, 3000), (51, 1)])
def test_extreme_aspect_refused(size):
    with pytest.raises(VLMError, match="aspect"):
        normalize_image(Image.new("L", size))


def test_too_many_pixels_refused():
    def png_header(w: int, h: int) -> bytes:  # a PNG that claims w x h; pixels never decoded
        ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
        chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")

    for w, h in [(12000, 9000), (30000, 30000)]:
        with pytest.raises(VLMError, match="too large") as err:
            normalize_image(png_header(w, h))
        _one_line(err)


def test_normalize_arrays():
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(normalize_image(u8)), u8)
    f = u8.astype(np.float64) / 255.0
    assert np.array_equal(np.asarray(normalize_image(f)), u8)
    assert normalize_image(rng.random((30, 40))).size == (40, 30)
    assert normalize_image(rng.random((30, 40, 1)).astype(np.float32)).size == (40, 30)
    rgba = np.zeros((30, 40, 4), dtype=np.uint8)
    assert normalize_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert normalize_image(np.zeros((3, 30, 40), dtype=np.uint8)).size == (40, 30)  # CHW
    assert normalize_image(np.full((30, 40), 65535, dtype=np.uint16)).getpixel((0, 0)) == (255, 255, 255)
    for bad in [
        np.full((30, 40), -0.5),
        np.full((30, 40), np.nan),
        np.zeros((30, 40), dtype=object),
        np.zeros((0, 4, 3), dtype=np.uint8),
        np.zeros((5, 30, 40, 3), dtype=np.uint8),
    ]:
        with pytest.raises(VLMError):
            normalize_image(bad)


def test_normalize_files_and_bytes(tmp_path):
    p = tmp_path / "x.png"
    Image.new("RGBA", (40, 30), (0, 0, 0, 0)).save(p)
    assert normalize_image(str(p)).getpixel((0, 0)) == (255, 255, 255)
    assert normalize_image(p.read_bytes()).size == (40, 30)
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (9, 9, 9)).save(buf, format="JPEG")
    assert normalize_image(io.BytesIO(buf.getvalue())).size == (40, 30)
    for bad in [b"not an image at all", b"", p.read_bytes()[:40], str(tmp_path / "missing.png"), 42]:
        with pytest.raises(VLMError) as err:
            normalize_image(bad)
        _one_line(err)
