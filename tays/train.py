"""SFT of the demo model for streaming video reasoning: TaYS and two baselines (issue 5, item 2).

    python -m tays train --paradigm tays --steps 600 --minutes 50 --out runs/tays/tays
    python -m tays train --paradigm batch ...        # watch everything, then think
    python -m tays train --paradigm interleaved ...  # frame, step, frame, step, ... one causal sequence
    accelerate launch -m tays train --paradigm tays ...   # GPUs, data parallel

All three start from the shipped image demo model (`assets/demo-model`, or --model), read the
same training streams (shapes world, TRAINING seeds only; `tays.data` trajectories at 2 FPS with
the consistency filter) and run the same steps / batch / budget; only the sequence layout, the
mask and the positions differ. Each layout is exactly what its paradigm's inference computes
(`tays.paradigms`), so what is trained is what is run (tests/test_tays_train.py checks the
logits against the inference code paths):

* reasoning tokens: the assistant header (``<|im_start|>assistant\\n<think>``), then
  - streaming (tays, interleaved): one reasoning call per frame group, as the runner does: an
    empty step ``<|eot|>`` at the question (no frame yet), then after frame group g either the
    step(s) placed at g (`` The red circle appears.<|eot|>``) or ``<|eot|>`` (nothing new);
  - batch: every step back to back after all frames;
  then ``</think>``, `` answer`` and ``<|im_end|>``. The loss covers every token after the header.
  A token is fed in the call that generates the token after it (the runner feeds the last
  token of a step when the next step starts), so each token sees the frames that call saw.
* tays: prompt | frame groups and reasoning with the streaming mask (`tays.mask.streaming_mask`:
  a reasoning token sees the prompt, the frame groups of its call and earlier reasoning; frames
  never see reasoning) and decoupled positions (`tays.positions.streaming_position_ids`), the
  StreamingEngine's layout, built from the same functions.
* interleaved: prompt | call 0 | group 0 | call 1 | group 1 | ... in one causal sequence with
  standard mRoPE (each group a vision block at the next free position), as `CausalSequence`.
* batch: prompt | all groups as one vision block | reasoning and answer, causal.

The vision tower is frozen (it already encodes shapes-world frames; it is most of the step time on
CPU, so freezing it about halves a step); everything else is trained. Checkpoints (accelerate
state + step) go to --run-dir every --save-every steps; rerunning the same command resumes. The final model is saved as
safetensors with its tokenizer, image processor and a training.json (paradigm, seeds used,
steps, minutes, data settings and skip counts).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from tays.data import (
    DEFAULT_FPS,
    DEFAULT_THRESHOLD,
    EncoderError,
    SkipSample,
    Trajectory,
    build_trajectory,
    make_encoder,
    shapes_encoder,
    shapes_sample,
)
from tays.forward import video_interval
from tays.mask import FRAME, PROMPT, TEXT, Segment, streaming_mask
from tays.positions import frame_position_ids, streaming_position_ids, text_position_ids
from tays.protocol import PARADIGMS, chat_template_ids
from vstream.model import END_OF_STEP, THINK_CLOSE, THINK_OPEN, VLM, VLMError, load_vlm
from vstream.world.assets import DEMO_MODEL_DIR
from vstream.world.checkpoints import agreed_seconds, lr_at, resume, save_final, save_step
from vstream.world.shapes import TRAIN_SEEDS
from vstream.world.shapes_video import make_stream

if TYPE_CHECKING:  # annotation only: importing transformers costs seconds at start-up
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "IGNORE",
    "Layout",
    "SetupError",
    "StreamingLM",
    "TrajectoryCollator",
    "build_layout",
    "reasoning_tokens",
    "train",
]

DEFAULT_MODEL = DEMO_MODEL_DIR
IGNORE = -100
OTHER, EMPTY_STEP, ANSWER = 0, 1, 2  # label roles, for the loss weights


# ----------------------------------------------------------------------------------------------
# token layout


def _ids(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"] if text else []


def reasoning_tokens(traj: Trajectory, tok: PreTrainedTokenizerBase, paradigm: str) -> tuple[list[int], list[int]]:
    """(body token ids, frame groups visible to the call that generates each token)."""
    eot = tok.convert_tokens_to_ids(END_OF_STEP)
    end = tok.convert_tokens_to_ids(THINK_CLOSE)
    if eot is None or eot == tok.unk_token_id or end is None or end == tok.unk_token_id:
        raise ValueError(f"the tokenizer needs the special tokens {END_OF_STEP} and {THINK_CLOSE}")
    G = traj.n_groups
    step_ids = [_ids(tok, " " + s.text) + [eot] for s in traj.steps]
    ids: list[int] = []
    fs: list[int] = []
    if paradigm == "batch":
        for s in step_ids:
            ids += s
        fs = [G] * len(ids)
    else:
        ids, fs = [eot], [0]
        by_group: dict[int, list[int]] = {}
        for st, s in zip(traj.steps, step_ids):
            by_group.setdefault(st.group, []).extend(s)
        for g in range(G):
            s = by_group.get(g, [eot])
            ids += s
            fs += [g + 1] * len(s)
    tail = [end] + _ids(tok, " " + traj.answer) + [int(tok.eos_token_id)]
    return ids + tail, fs + [G] * len(tail)


@dataclass
class Layout:
    """One training sequence: segments in order, each ('prompt', ids) / ('frame', group) /
    ('text', ids, labels, frames_seen, roles); a label's role is OTHER, EMPTY_STEP (an empty step's
    end-of-step) or ANSWER (the answer after ``</think>`` and the final end), which
    `--empty-step-weight` and `--answer-weight` weigh."""

    paradigm: str
    items: list[tuple]
    n_groups: int
    group_times: list[float]


def build_layout(traj: Trajectory, tok: PreTrainedTokenizerBase, paradigm: str) -> Layout:
    if paradigm not in PARADIGMS:
        raise ValueError(f"unknown paradigm {paradigm!r}; choose from {', '.join(PARADIGMS)}")
    prompt, header = chat_template_ids(tok, traj.question, assistant_prefix=THINK_OPEN)  # as inference
    body, gen_fs = reasoning_tokens(traj, tok, paradigm)
    R = header + body
    H = len(header)
    fed = R[:-1]
    labels = [R[j + 1] if j + 1 >= H else IGNORE for j in range(len(fed))]
    fed_fs = [gen_fs[max(0, j + 1 - H)] for j in range(len(fed))]
    eot = tok.convert_tokens_to_ids(END_OF_STEP)
    answer_from = len(R) - R[::-1].index(tok.convert_tokens_to_ids(THINK_CLOSE))  # just after the last </think>
    roles = []
    for j in range(len(fed)):
        if j + 1 >= answer_from:
            roles.append(ANSWER)
        elif j + 1 >= H and R[j + 1] == eot and (j + 1 == H or R[j] == eot):
            roles.append(EMPTY_STEP)  # "nothing new": an end-of-step opening the body or following another
        else:
            roles.append(OTHER)
    # runs of fed tokens with the same visible frame groups = the decode calls
    runs: list[tuple[list[int], list[int], int, list[int]]] = []
    for i, l, f, e in zip(fed, labels, fed_fs, roles):
        if runs and runs[-1][2] == f:
            runs[-1][0].append(i)
            runs[-1][1].append(l)
            runs[-1][3].append(e)
        else:
            runs.append(([i], [l], f, [e]))
    G = traj.n_groups
    items: list[tuple] = [("prompt", list(prompt))]
    if paradigm == "batch":
        items += [("frame", g) for g in range(G)]
        items += [("text", *run) for run in runs]
    else:
        shown = 0
        for run in runs:
            while shown < run[2]:
                items.append(("frame", shown))
                shown += 1
            items.append(("text", *run))
        items += [("frame", g) for g in range(shown, G)]
    return Layout(paradigm, items, G, [traj.group_time(g) for g in range(G)])


def layout_tensors(
    layout: Layout, grids: list[tuple[int, int]], interval: torch.Tensor
) -> tuple[list[int], list[bool], torch.Tensor, torch.Tensor, list[int], list[int]]:
    """(input ids (0 at frame tokens), frame-token flags, (3, L) positions, (L, L) bool mask,
    labels, label roles) of a layout, frame group g having token grid grids[g]."""
    ids: list[int] = []
    is_frame: list[bool] = []
    labels: list[int] = []
    roles: list[int] = []
    for it in layout.items:
        if it[0] == "frame":
            th, tw = grids[it[1]]
            ids += [0] * (th * tw)
            is_frame += [True] * (th * tw)
            labels += [IGNORE] * (th * tw)
            roles += [OTHER] * (th * tw)
        else:
            ids += it[1]
            is_frame += [False] * len(it[1])
            labels += it[2] if it[0] == "text" else [IGNORE] * len(it[1])
            roles += it[4] if it[0] == "text" else [OTHER] * len(it[1])
    if layout.paradigm == "tays":
        segs = []
        for it in layout.items:
            if it[0] == "prompt":
                segs.append(Segment(PROMPT, len(it[1])))
            elif it[0] == "frame":
                g = it[1]
                th, tw = grids[g]
                segs.append(Segment(FRAME, th * tw, time=layout.group_times[g], grid=(th, tw), index=g))
            else:
                f = it[3]
                t = layout.group_times[f - 1] if f > 0 else -math.inf
                segs.append(Segment(TEXT, len(it[1]), time=t, frames_seen=f))
        pos = streaming_position_ids(segs, interval)
        mask = streaming_mask(segs)
        return ids, is_frame, pos, mask, labels, roles
    # batch / interleaved: one causal sequence, standard mRoPE (as tays.paradigms.CausalSequence)
    parts, nxt = [], 0
    block_base = None
    for it in layout.items:
        if it[0] == "frame":
            g = it[1]
            if layout.paradigm == "batch":
                block_base = nxt if block_base is None else block_base
                p = frame_position_ids(block_base, g, grids[g], interval)
            else:
                p = frame_position_ids(nxt, 0, grids[g], interval)
            nxt = max(nxt, int(p.max()) + 1)
        else:
            p = text_position_ids(nxt, 0, len(it[1]))
            nxt += len(it[1])
        parts.append(p)
    pos = torch.cat(parts, dim=1)
    L = pos.shape[1]
    mask = torch.ones(L, L, dtype=torch.bool).tril()
    return ids, is_frame, pos, mask, labels, roles


# ----------------------------------------------------------------------------------------------
# batches and the training forward


class TrajectoryCollator:
    """Trajectories -> a padded batch for `StreamingLM` (frames rendered and preprocessed here,
    so DataLoader workers can do it). `vlm` is a `vstream.model.VLM`: only its tokenizer, image
    processor and config are used (the collator keeps no reference to the model). Skip markers
    (reason strings) in the batch are counted in `self.skipped` and listed under "skipped" in
    the batch; a batch with no usable trajectory holds only that list."""

    def __init__(
        self,
        vlm: VLM,
        paradigm: str,
        fps: float = DEFAULT_FPS,
        empty_step_weight: float = 1.0,
        answer_weight: float = 1.0,
    ):
        for name, w in (("empty_step_weight", empty_step_weight), ("answer_weight", answer_weight)):
            if not w >= 0:
                raise ValueError(f"{name} must be >= 0, got {w}")
        self.paradigm = paradigm
        self.role_weights = torch.tensor([1.0, float(empty_step_weight), float(answer_weight)])
        self.interval = video_interval(vlm, fps)
        self.vlm = replace(vlm, model=None)
        self.skipped: Counter = Counter()

    def __call__(self, batch: list[Any]) -> dict[str, Any] | None:
        vlm = self.vlm
        tp, m = vlm.temporal_patch_size, vlm.merge_size
        seqs, pvs, grid_rows, skipped = [], [], [], []
        for traj in batch:
            if isinstance(traj, str):
                self.skipped[traj] += 1
                skipped.append(traj)
                continue
            frames = [f for _, f in traj.frames()]
            grids = []
            for g in range(traj.n_groups):
                pv, (_, th, tw), *_ = vlm.video_patches(frames[g * tp : (g + 1) * tp])
                pvs.append(pv)
                grids.append((th, tw))
                grid_rows.append([1, th * m, tw * m])
            layout = build_layout(traj, vlm.tokenizer, self.paradigm)
            seqs.append(layout_tensors(layout, grids, self.interval))
        if not seqs:
            return {"skipped": skipped}
        B, L = len(seqs), max(len(s[0]) for s in seqs)
        ids = torch.zeros(B, L, dtype=torch.long)
        fmask = torch.zeros(B, L, dtype=torch.bool)
        pos = torch.zeros(3, B, L, dtype=torch.long)
        attn = torch.eye(L, dtype=torch.bool).repeat(B, 1, 1, 1).view(B, 1, L, L)  # pads: self only
        labels = torch.full((B, L), IGNORE, dtype=torch.long)
        roles = torch.zeros(B, L, dtype=torch.long)
        for b, (i, f, p, mk, lab, r) in enumerate(seqs):
            n = len(i)
            ids[b, :n] = torch.tensor(i)
            fmask[b, :n] = torch.tensor(f)
            pos[:, b, :n] = p
            attn[b, 0, :n, :n] = mk
            labels[b, :n] = torch.tensor(lab)
            roles[b, :n] = torch.tensor(r)
        out = {
            "input_ids": ids,
            "frame_mask": fmask,
            "pixel_values": torch.cat(pvs),
            "grid_thw": torch.tensor(grid_rows, dtype=torch.long),
            "position_ids": pos,
            "attn": attn,
            "labels": labels,
            "skipped": skipped,
        }
        w = self.role_weights[roles]
        if bool((w != 1.0).any()):  # else: the plain mean, bit for bit
            out["loss_weights"] = w
        return out


class StreamingLM(torch.nn.Module):
    """A Qwen2.5-VL model run on a layout batch: vision tower on the frame groups, their features
    placed at the frame tokens, then transformers' own decoder with the given 3-D positions and
    4-D mask (the way `tays.forward.streaming_forward` drives it). Returns (loss, logits); the
    labels are already next-token targets per position (no shift)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids,
        frame_mask,
        pixel_values,
        grid_thw,
        position_ids,
        attn,
        labels=None,
        loss_weights=None,
        skipped=None,
    ):
        m = self.model
        emb = m.get_input_embeddings()(input_ids)
        if pixel_values.numel():
            visual = m.model.visual
            frozen = not any(p.requires_grad for p in visual.parameters())
            with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
                out = visual(pixel_values.to(dtype=next(visual.parameters()).dtype), grid_thw=grid_thw)
            vis = out.pooler_output if hasattr(out, "pooler_output") else out
            emb = emb.masked_scatter(frame_mask[..., None].expand_as(emb), vis.to(emb.dtype))
        mask = torch.zeros(attn.shape, dtype=emb.dtype, device=emb.device)
        mask.masked_fill_(~attn, torch.finfo(emb.dtype).min)
        lm = m.model.language_model
        layer_types = set(getattr(lm.config, "layer_types", None) or ["full_attention"])
        h = lm(
            inputs_embeds=emb, position_ids=position_ids, attention_mask={t: mask for t in layer_types}, use_cache=False
        ).last_hidden_state
        logits = m.lm_head(h)
        loss = None
        if labels is not None and loss_weights is None:
            loss = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE
            )
        elif labels is not None:  # weighted mean over the labelled tokens
            ce = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="none"
            )
            w = loss_weights.reshape(-1).float() * (labels.reshape(-1) != IGNORE)
            loss = (ce * w).sum() / w.sum().clamp_min(1e-6)
        return loss, logits


# ----------------------------------------------------------------------------------------------
# data


class TrainStreams(torch.utils.data.Dataset):
    """Index i -> the trajectory of the shapes-world stream with training seed `start + i`
    (built lazily), or a skip-reason string when the sample is skipped."""

    def __init__(
        self,
        n: int,
        start: int = 0,
        duration: float | None = None,
        threshold: float = DEFAULT_THRESHOLD,
        encoder: Any = None,
        group_size: int = 2,
    ):
        if start < 0 or start + n > len(TRAIN_SEEDS):
            raise ValueError("more streams asked for than the training split holds")
        self.n, self.start, self.duration = n, start, duration
        self.threshold, self.encoder, self.group_size = threshold, encoder, group_size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        s = shapes_sample(make_stream(TRAIN_SEEDS[self.start + i], self.duration))
        try:
            return build_trajectory(s, self.encoder or shapes_encoder(), self.threshold, DEFAULT_FPS, self.group_size)
        except SkipSample as e:
            return e.reason


# ----------------------------------------------------------------------------------------------
# the training run (python -m tays train)


class SetupError(ValueError):
    """The run cannot start: the model, the encoder, the loss weights, the state to resume or the
    seed range. The message is one line."""


def train(
    paradigm: str = "tays",
    steps: int = 600,
    minutes: float | None = None,
    out: Path | None = None,
    model: str = str(DEFAULT_MODEL),
    batch_size: int = 8,
    lr: float = 3e-4,
    run_dir: Path | None = None,
    save_every: int = 100,
    seed: int = 0,
    seed_start: int = 0,
    duration: float | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    encoder: str = "tfidf",
    save_dtype: str = "float16",
    threads: int = 0,
    workers: int = 0,
    empty_step_weight: float = 1.0,
    answer_weight: float = 1.0,
) -> dict[str, Any] | None:
    """SFT of `model` for `paradigm` on `steps` x `batch_size` training streams per process (see
    the module docstring and ``python -m tays train --help`` for every option). Checkpoints go to
    `run_dir` (default OUT.run), and a rerun resumes there; the final model goes to `out` (default
    runs/tays/PARADIGM). Returns the saved training.json (None on processes but the main one)."""
    if threads:
        torch.set_num_threads(threads)
    out = out or Path("runs/tays") / paradigm
    run_dir = run_dir or out.with_name(out.name + ".run")
    acc = Accelerator(cpu=not torch.cuda.is_available())
    acc.print(f"{acc.num_processes} process(es) on {acc.device}, {acc.distributed_type}; paradigm {paradigm}")
    set_seed(seed)
    try:
        vlm = load_vlm(model, dtype="float32", device="cpu")
    except VLMError as e:
        raise SetupError(str(e)) from None
    try:
        enc = shapes_encoder() if encoder == "tfidf" else make_encoder(encoder)
    except EncoderError as e:
        raise SetupError(str(e)) from None
    vlm.model.model.visual.requires_grad_(False)
    lm = StreamingLM(vlm.model)
    lm.train()
    trained = [p for p in lm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    n_streams = steps * batch_size * acc.num_processes
    if seed_start + n_streams > len(TRAIN_SEEDS):
        raise SetupError("--seed-start + streams used would leave the training split")
    data = TrainStreams(n_streams, seed_start, duration, threshold, enc, vlm.temporal_patch_size)
    try:
        collate = TrajectoryCollator(vlm, paradigm, empty_step_weight=empty_step_weight, answer_weight=answer_weight)
    except ValueError as e:
        raise SetupError(str(e)) from None
    loader = torch.utils.data.DataLoader(
        data, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=workers
    )
    skipped: Counter = Counter()
    lm, opt, loader = acc.prepare(lm, opt, loader)

    state = run_dir / "latest"
    recipe = {"paradigm": paradigm, "empty_step_weight": empty_step_weight, "answer_weight": answer_weight}
    try:
        record = resume(acc, state, match=recipe)
    except ValueError as e:
        raise SetupError(str(e)) from None
    start, ema, before = record.get("step", 0), record.get("loss_ema"), record.get("seconds", 0.0)
    batches = acc.skip_first_batches(loader, start) if start else loader

    t0 = time.time()
    bar = tqdm(total=steps, initial=start, disable=not acc.is_main_process, desc=f"train {paradigm}")
    step = start
    for batch in batches:
        if step >= steps:
            break
        skipped.update(batch.pop("skipped", []))
        if "input_ids" not in batch:  # every stream of the batch was skipped
            continue
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, 50)
        loss, _ = lm(**batch)
        acc.backward(loss)
        acc.clip_grad_norm_(trained, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}")
        # the budget counts earlier runs of a resumed training too, and all processes agree on it
        out_of_time = minutes is not None and agreed_seconds(acc, before + time.time() - t0) > minutes * 60
        if step % save_every == 0 or out_of_time or step == steps:
            save_step(acc, state, {"step": step, "loss_ema": ema, "seconds": before + time.time() - t0, **recipe})
        if out_of_time:
            acc.print(f"stopping at step {step}: --minutes {minutes} reached")
            break
    bar.close()

    acc.wait_for_everyone()
    if acc.is_main_process:
        final = acc.unwrap_model(lm).model
        used = step * batch_size * acc.num_processes
        meta = {
            **recipe,
            "base_model": str(model),
            "trained_steps": step,
            "batch_size": batch_size * acc.num_processes,
            "split": "train",
            "train_seeds": [TRAIN_SEEDS[seed_start], TRAIN_SEEDS.start + seed_start + used],
            "minutes": round((before + time.time() - t0) / 60, 2),
            "parameters": sum(p.numel() for p in final.parameters()),
            "trained_parameters": sum(p.numel() for p in trained),
            "vision_tower": "frozen",
            "final_loss_ema": ema,
            "processes": acc.num_processes,
            "data": {
                "fps": DEFAULT_FPS,
                "group_size": vlm.temporal_patch_size,
                "duration": duration,
                "threshold": threshold,
                "encoder": encoder,
                "skipped_this_run": dict(skipped),
            },
            "format": {
                "assistant_prefix": THINK_OPEN,
                "answer_prefix": THINK_CLOSE,
                "end_of_step": END_OF_STEP,
                "streaming_calls": "one reasoning call per frame group" if paradigm != "batch" else None,
            },
        }
        save_final(final, vlm.tokenizer, vlm.image_processor, out, meta, getattr(torch, save_dtype))
        return meta
    return None
