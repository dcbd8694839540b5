"""Train the demo thinking model on the shapes world (CPU, or GPUs through `accelerate launch`).

    python -m vstream train-demo --minutes 45                      # one CPU process
    accelerate launch --cpu --num_processes 2 -m vstream train-demo --steps 20 --out /tmp/demo
    accelerate launch --multi_gpu --num_processes 2 -m vstream train-demo ...  # 2 CPU processes (gloo)
    accelerate launch -m vstream train-demo                         # all local GPUs, data parallel

Scenes come only from the training seed range; every process reads its own shard of it.
Besides the language-model loss on the trace, a throw-away linear probe on the vision tokens
learns each token's object colour, kind and digit from the scene's masks (a dense stage-1 style
alignment signal; with --position-probe also its grid row and column). It makes the vision tower
useful within minutes on CPU; it is not saved.
Checkpoints (accelerate state + step) are written every `--save-every` steps to `--run-dir`;
rerunning the same command resumes from the latest one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from vstream.world.assets import DEMO_MODEL_DIR
from vstream.world.checkpoints import (
    agreed_seconds,
    lr_at,
    resume,
    save_final,
    save_step,
)
from vstream.world.demo_model import (
    MERGE,
    PATCH,
    Collator,
    build_demo_model,
    make_image_processor,
    make_tokenizer,
    warm_start,
)
from vstream.world.shapes import (
    CELL,
    COLORS,
    FAMILIES,
    GRID,
    SHAPES,
    TRAIN_SEEDS,
    Scene,
    make_inventory,
    make_scene,
)

INVENTORY_SHARE = 1  # out of every 10 training samples: the dense "List every object." task
SMALL_SHARE = 1  # out of every 10: drawn at 224 px (16 tokens, as video frames are), not 448
# a training scene's family is drawn from this list by its seed, so the families furthest from
# their targets on validation scenes come more often. The run behind the shipped model changed it
# twice: each family once until step 2,000 (the family cycling with the seed), then spatial,
# chain, sum_boxes and odd_one_out twice until step 2,971, then spatial, chain and odd_one_out
# three times until step 4,320; the two fine-tunes that taught odd_one_out its last steps used this.
TRAIN_CYCLE = (*FAMILIES, *("odd_one_out",) * 4, "chain", "chain", "spatial")


class TrainScenes(Dataset):
    """Index i -> training sample with seed i: a scene of a family from TRAIN_CYCLE, or (1 in 10)
    the dense inventory task; 1 in 10 drawn small. Built lazily, so the data set costs no memory."""

    def __init__(self, n: int):
        if n > len(TRAIN_SEEDS):
            raise ValueError("more scenes asked for than the training split holds")
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        seed = TRAIN_SEEDS[i]
        family = TRAIN_CYCLE[int(np.random.default_rng([seed, 7]).integers(len(TRAIN_CYCLE)))]
        scene = make_inventory(seed) if i % 10 < INVENTORY_SHARE else make_scene(seed, family)
        if i % 10 >= 10 - SMALL_SHARE:
            scene.scale = 1
        return scene


TOKEN_PX = MERGE * PATCH  # one LLM image token of the demo model covers 56x56 image pixels
KINDS = (*SHAPES, "box", "bar")
PROBE_HEADS = (len(COLORS) + 1, len(KINDS) + 1, 10 + 1)  # colour, kind, digit/value; 0 = none
POS_HEADS = (GRID, GRID)  # grid row, grid column of the token (the trace's "row 3", "column 2")


def token_targets(scene: Scene, min_cover: float = 0.1) -> torch.Tensor:
    """(tokens, 5) class ids per image token, raster order: colour, kind and digit of the object
    covering most of the token (0 = none), then the token's 0-based grid row and column."""
    side = scene.image_size // TOKEN_PX
    cover = np.zeros((len(scene.objects), side, side), np.float32)
    for i in range(len(scene.objects)):
        m = scene.mask(i).reshape(side, TOKEN_PX, side, TOKEN_PX)
        cover[i] = m.mean(axis=(1, 3))
    out = torch.zeros((side * side, 5), dtype=torch.long)
    idx = torch.arange(side * side)
    cell_px = CELL * scene.scale
    out[:, 3] = (idx // side) * TOKEN_PX // cell_px
    out[:, 4] = (idx % side) * TOKEN_PX // cell_px
    if not len(scene.objects):
        return out
    best, frac = cover.argmax(0).reshape(-1), cover.max(0).reshape(-1)
    colors, kinds = list(COLORS), list(KINDS)
    for t in np.flatnonzero(frac >= min_cover):
        o = scene.objects[best[t]]
        out[t, 0] = colors.index(o.color) + 1
        out[t, 1] = kinds.index(o.shape if o.kind == "shape" else o.kind) + 1
        out[t, 2] = int(o.label) + 1 if o.label.isdigit() else 0
    return out


class TrainCollator(Collator):
    def __call__(self, batch: list[Scene]) -> dict[str, torch.Tensor]:
        out = super().__call__(batch)
        out["token_targets"] = torch.cat([token_targets(s) for s in batch])
        return out


class WithProbe(torch.nn.Module):
    """The VLM plus a probe on its merged vision tokens; loss = LM + probe CE.

    The probe's class vectors are the language model's own (tied) embeddings of the class
    words (" red", " circle", " 7", ...), plus one learned "nothing here" vector per head: vision
    tokens are pulled towards the words the trace will say about them, which makes the
    text-to-image lookups (which object is "the red one"?) and copying its digit out cheap to learn.
    With `position`, two more heads with learned class vectors give each token its grid row and
    column, so "which row is it in" can be read from the token too (the values carry no usable
    position otherwise: mRoPE only rotates queries and keys).
    """

    def __init__(self, model, tokenizer, weight: float = 1.0, position: bool = False):
        super().__init__()
        self.model = model
        self.weight = weight
        words = (list(COLORS), list(KINDS), [str(d) for d in range(10)])
        ids = [[tokenizer(" " + w, add_special_tokens=False).input_ids for w in ws] for ws in words]
        if any(len(i) != 1 for head in ids for i in head):
            raise ValueError("probe class words must be single tokens of the demo tokenizer")
        self._ids = [torch.tensor([i[0] for i in head]) for head in ids]
        hidden = model.config.text_config.hidden_size
        self.none = torch.nn.Parameter(torch.zeros(len(words), hidden))
        self.bias = torch.nn.Parameter(torch.zeros(sum(PROBE_HEADS)))
        self.pos = torch.nn.Parameter(torch.randn(sum(POS_HEADS), hidden) * 0.02) if position else None
        self.pos_bias = torch.nn.Parameter(torch.zeros(sum(POS_HEADS))) if position else None
        self._vision = None
        model.model.visual.register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        self._vision = output.pooler_output

    def probe_logits(self, vision: torch.Tensor) -> list[torch.Tensor]:
        emb = self.model.get_input_embeddings().weight
        out, b = [], self.bias.split(PROBE_HEADS)
        for k, ids in enumerate(self._ids):
            classes = torch.cat([self.none[k : k + 1], emb[ids.to(emb.device)]])  # (1 + C, hidden)
            out.append(vision.float() @ classes.float().T + b[k])
        if self.pos is None:
            return out
        pos = vision.float() @ self.pos.float().T + self.pos_bias
        return out + list(pos.split(POS_HEADS, -1))

    def forward(self, token_targets: torch.Tensor, **batch) -> tuple[torch.Tensor, torch.Tensor]:
        lm = self.model(**batch).loss
        logits = self.probe_logits(self._vision)
        probe = sum(torch.nn.functional.cross_entropy(lg, token_targets[:, k]) for k, lg in enumerate(logits))
        self._vision = None
        probe = probe / len(logits)
        return lm + self.weight * probe, probe.detach()


def run_tokenizer(acc: Accelerator, run_dir: Path) -> PreTrainedTokenizerFast:
    """The run's vocabulary: the one saved in `run_dir` when resuming, else a fresh BPE saved
    there. The BPE is trained on generated scenes, so a change to the world's generators would
    otherwise renumber the tokens under a resumed checkpoint."""
    saved = Path(run_dir) / "tokenizer"
    if (saved / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(saved))
    tok = make_tokenizer()
    acc.wait_for_everyone()
    if acc.is_main_process:
        tok.save_pretrained(str(saved))
    return tok


def train(
    steps: int = 2000,
    minutes: float | None = None,
    batch_size: int = 32,
    lr: float = 1e-3,
    out: Path = DEMO_MODEL_DIR,
    run_dir: Path = Path("runs/demo"),
    save_every: int = 200,
    seed: int = 0,
    workers: int = 0,
    probe_weight: float = 1.0,
    position_probe: bool = False,
    init: Path | None = None,
) -> dict | None:
    """Train (or resume) the demo model in every process of the current accelerate launch;
    returns the training record on the main process (None on the others)."""

    # cpu=True without CUDA: then `--multi_gpu --num_processes N` runs N gloo processes on CPU
    acc = Accelerator(cpu=not torch.cuda.is_available())
    acc.print(f"{acc.num_processes} process(es) on {acc.device}, {acc.distributed_type}")
    set_seed(seed)
    tok = run_tokenizer(acc, run_dir)
    ip = make_image_processor()
    vlm = build_demo_model(tok)
    init_record = warm_start(vlm, tok, init) if init is not None else None
    model = WithProbe(vlm, tok, weight=probe_weight, position=position_probe)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    data = TrainScenes(steps * batch_size * acc.num_processes)
    loader = DataLoader(
        data,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=TrainCollator(tok, ip),
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    model, opt, loader = acc.prepare(model, opt, loader)

    state = run_dir / "latest"
    record = resume(acc, state)
    start, ema, before = record.get("step", 0), record.get("loss_ema"), record.get("seconds", 0.0)
    pema = None
    batches = acc.skip_first_batches(loader, start) if start else loader

    t0 = time.time()
    bar = tqdm(total=steps, initial=start, disable=not acc.is_main_process, desc="train demo")
    step = start
    model.train()
    for batch in batches:
        if step >= steps:
            break
        spent = agreed_seconds(acc, before + time.time() - t0)  # same LR and stop step everywhere
        time_frac = spent / (minutes * 60) if minutes else 0.0
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, 100, time_frac)
        loss, probe = model(**batch)
        acc.backward(loss)
        acc.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        pema = probe.item() if pema is None else 0.98 * pema + 0.02 * probe.item()
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}", probe=f"{pema:.3f}")
        out_of_time = minutes is not None and spent > minutes * 60
        if step % save_every == 0 or out_of_time or step == steps:
            save_step(acc, state, {"step": step, "loss_ema": ema, "seconds": before + time.time() - t0})
        if out_of_time:
            acc.print(f"stopping at step {step}: --minutes {minutes} reached")
            break
    bar.close()

    acc.wait_for_everyone()
    if acc.is_main_process:
        final = acc.unwrap_model(model).model
        meta = {
            "trained_steps": step,
            "batch_size": batch_size * acc.num_processes,
            "train_seeds": [TRAIN_SEEDS.start, TRAIN_SEEDS.start + step * batch_size * acc.num_processes],
            "minutes": round((before + time.time() - t0) / 60, 2),
            "parameters": sum(p.numel() for p in final.parameters()),
            "final_loss_ema": ema,
            "final_probe_loss_ema": pema,
            "processes": acc.num_processes,
            "position_probe": position_probe,
            "init": init_record,
        }
        save_final(final, tok, ip, out, meta)
        acc.print(json.dumps(meta))
        return meta
    return None
