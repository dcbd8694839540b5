"""Train the demo thinking model on the shapes world (CPU, or GPUs through `accelerate launch`).

    python -m vstream train-demo --minutes 45                      # one CPU process
    accelerate launch --cpu --num_processes 2 -m vstream train-demo --steps 20 --out /tmp/demo
    accelerate launch --multi_gpu --num_processes 2 -m vstream train-demo ...  # 2 CPU processes (gloo)
    accelerate launch -m vstream train-demo                         # all local GPUs, data parallel

Scenes come only from the training seed range; every process reads its own shard of it.
Checkpoints (accelerate state + step) are written every `--save-every` steps to `--run-dir`;
rerunning the same command resumes from the latest one.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .demo_model import DEMO_MODEL_DIR, Collator, build_demo_model, make_image_processor, make_tokenizer
from .shapes import TRAIN_SEEDS, make_inventory, make_scene

INVENTORY_SHARE = 4  # out of every 10 training samples: the dense "List every object." task


class TrainScenes(Dataset):
    """Index i -> training sample with seed i: a scene of the six families, or (4 in 10) the
    dense inventory task. Built lazily, so the data set costs no memory."""

    def __init__(self, n: int):
        if n > len(TRAIN_SEEDS):
            raise ValueError("more scenes asked for than the training split holds")
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        seed = TRAIN_SEEDS[i]
        return make_inventory(seed) if i % 10 < INVENTORY_SHARE else make_scene(seed)


def lr_at(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m vstream train-demo", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000, help="optimizer steps (the LR schedule spans these)")
    ap.add_argument("--minutes", type=float, default=None, help="stop early after this much wall time")
    ap.add_argument("--batch-size", type=int, default=32, help="per process")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", type=Path, default=DEMO_MODEL_DIR, help="where the final model is saved")
    ap.add_argument("--run-dir", type=Path, default=Path("runs/demo"), help="checkpoints for resuming")
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    # cpu=True without CUDA: then `--multi_gpu --num_processes N` runs N gloo processes on CPU
    acc = Accelerator(cpu=not torch.cuda.is_available())
    acc.print(f"{acc.num_processes} process(es) on {acc.device}, {acc.distributed_type}")
    set_seed(args.seed)
    tok = make_tokenizer()
    ip = make_image_processor()
    model = build_demo_model(tok)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    data = TrainScenes(args.steps * args.batch_size * acc.num_processes)
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=False, collate_fn=Collator(tok, ip))
    model, opt, loader = acc.prepare(model, opt, loader)

    start, ema, before = 0, None, 0.0
    state = args.run_dir / "latest"
    if (state / "step.json").exists():
        acc.load_state(str(state))
        record = json.loads((state / "step.json").read_text())
        start, ema, before = record["step"], record.get("loss_ema"), record.get("seconds", 0.0)
        acc.print(f"resuming from step {start} in {state}")
    batches = acc.skip_first_batches(loader, start) if start else loader

    t0 = time.time()
    bar = tqdm(total=args.steps, initial=start, disable=not acc.is_main_process, desc="train demo")
    step = start
    model.train()
    for batch in batches:
        if step >= args.steps:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr)
        loss = model(**batch).loss
        acc.backward(loss)
        acc.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}")
        out_of_time = args.minutes is not None and time.time() - t0 > args.minutes * 60
        if step % args.save_every == 0 or out_of_time or step == args.steps:
            acc.save_state(str(state))
            if acc.is_main_process:
                record = {"step": step, "loss_ema": ema, "seconds": before + time.time() - t0}
                (state / "step.json").write_text(json.dumps(record))
        if out_of_time:
            acc.print(f"stopping at step {step}: --minutes {args.minutes} reached")
            break
    bar.close()

    acc.wait_for_everyone()
    if acc.is_main_process:
        final = acc.unwrap_model(model)
        final.eval()
        args.out.mkdir(parents=True, exist_ok=True)
        # float16 on disk keeps the shipped weights small; loading upcasts to the chosen dtype.
        final.to(torch.float16).save_pretrained(args.out, safe_serialization=True)
        tok.save_pretrained(args.out)
        ip.save_pretrained(args.out)
        meta = {
            "trained_steps": step,
            "batch_size": args.batch_size * acc.num_processes,
            "train_seeds": [TRAIN_SEEDS.start, TRAIN_SEEDS.start + step * args.batch_size * acc.num_processes],
            "minutes": round((before + time.time() - t0) / 60, 2),
            "parameters": sum(p.numel() for p in final.parameters()),
            "final_loss_ema": ema,
            "processes": acc.num_processes,
        }
        (args.out / "training.json").write_text(json.dumps(meta, indent=2))
        acc.print(json.dumps(meta))


if __name__ == "__main__":
    main()
