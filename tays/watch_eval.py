"""Attribution while watching, measured: pointing in time and space, LDS against ablations, cost.

    python -m tays attribute-eval --json --n 100          # held-out shapes-world streams

Each held-out stream is replayed through the TaYS engine with a `tays.watch.StreamAttributor`
(the live path). Then the run is teacher-forced on its own trajectory: the engine's segments
(prompt, frame groups as they were committed, decode calls with the frames each one saw), fed
through one full masked forward (`tays.forward`, equal to the engine's decode, tests check
this). Frame groups are re-encoded with some regions painted in the frame's mean colour
(`vstream.attr.ablation.paint`, the still-image ablation operator). Frame groups and
teacher-forced masks are batched.

Per reasoning step that saw at least one frame group (a span), and per method (`vstream`: the
estimator's region scores; `raw_attention`: the attention mass summed over layers and heads;
`occlusion`: the measured effect of ablating each (group, region) alone):

* temporal pointing, over narrated steps (those `tays.metrics.match_event` ties to a
  ground-truth event): the step's top frame group (highest summed region score) shows the
  event, i.e. one of its frames lies in the event's keyframe interval [t, t + 1 s). Chance: the
  share of the frame groups the step saw that show it (averaged over steps).
* spatial pointing, same steps: the top region of the method's top group overlaps the event's
  object in that group's frame (where it is then; a vanished object: where it was at the event).
  Overlap: the region covers at least a quarter of the box or the box a quarter of the region.
  Chance: the share of regions that overlap, averaged over the groups the step saw.
* LDS: for `--masks` random ablations per stream (each picks frame groups with p = 0.5 and, in
  them, regions with p = 0.5, the still-image keep rate), the Spearman correlation across masks
  between the measured effect on the step (sum over its tokens of log p clean - log p ablated)
  and the method's sum of scores over the ablated units it could see. Mean over steps whose
  effects vary.
* overhead_ratio: decode tokens/s with attribution / without, on the first `--overhead-streams`
  streams each replayed both ways in this run (order alternating); the median of the ratios.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tays.forward import encode_frames, video_interval
from tays.mask import FRAME, PROMPT, TEXT, additive_mask, streaming_mask
from tays.metrics import RunResult, match_event
from tays.paradigms import run_paradigm
from tays.positions import streaming_position_ids
from tays.protocol import TRAINED
from tays.sources import ShapesSource
from tays.watch import StepScores, StreamAttributor, predictor, raw_attention_scores
from vstream.attr.ablation import paint
from vstream.attr.estimator import LinearEstimator, lds, train
from vstream.attr.estimator import load as load_estimator
from vstream.attr.labels import LabeledExample
from vstream.attr.regions import Regions
from vstream.model import VLM, VLMError, load_vlm, model_identity
from vstream.world.shapes_video import Stream, streams

__all__ = [
    "METHODS",
    "TeacherForcedStream",
    "evaluate_stream",
    "evaluate_streams",
    "load_video_labels",
    "save_labels",
    "summarize",
    "train_video_estimator",
]

METHODS = ("vstream", "raw_attention", "occlusion")
LABELS_FORMAT = "tays-video-labels/1"
OVERLAP = 0.25  # region/box overlap share that counts as pointing at the object


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class TeacherForcedStream:
    """One attributed run's trajectory, replayable with frame-group regions painted out.

    Target t is the generated token produced by decode call `calls[t]`: its log-probability is
    read at that call's last position (where the engine read the logits that picked it)."""

    def __init__(self, vlm: VLM, att: StreamAttributor, frames: dict[int, list[Any]], fps: float):
        self.vlm = vlm
        dev = vlm.device
        emb = vlm.model.get_input_embeddings()
        parts, self.group_at, self.call_end = [], {}, []
        self.pv: dict[int, tuple[torch.Tensor, tuple[int, int]]] = {}
        pos, call = 0, 0
        with torch.no_grad():
            for s in att.history:
                if s.kind == PROMPT:
                    e = emb(torch.tensor(att.prompt_ids, device=dev))
                elif s.kind == FRAME:
                    e, _ = encode_frames(vlm, frames[s.index])
                    self.group_at[s.index] = (pos, s.length)
                elif s.kind == TEXT:
                    e = emb(torch.tensor(att.recorder.fed_ids(call), device=dev))
                    call += 1
                    self.call_end.append(pos + s.length - 1)
                parts.append(e.to(vlm.dtype))
                pos += s.length
        self.frames = frames
        self.clean = torch.cat(parts)[None]  # (1, S, hidden)
        self.positions = streaming_position_ids(att.history, video_interval(vlm, fps), device=dev)[:, None]
        self.mask = additive_mask(streaming_mask(att.history, device=dev), dtype=vlm.dtype)

    def _patches(self, g: int) -> tuple[torch.Tensor, tuple[int, int]]:
        if g not in self.pv:
            pv, grid, *_ = self.vlm.video_patches(self.frames[g])
            self.pv[g] = (pv, (grid[1], grid[2]))
        return self.pv[g]

    @torch.no_grad()
    def _encode_painted(self, jobs: list[tuple[int, np.ndarray]]) -> list[torch.Tensor]:
        """[(group, (N,) bool ablated tokens)] -> [(N, hidden)] embeddings, in one vision call."""
        vlm, ms = self.vlm, self.vlm.merge_size
        pvs, grids = [], []
        for g, tok in jobs:
            pv, (th, tw) = self._patches(g)
            pvs.append(paint(pv, torch.as_tensor(tok)[None], ms))
            grids.append([1, th * ms, tw * ms])
        visual = vlm.model.model.visual
        out = visual(
            torch.cat(pvs).to(device=vlm.device, dtype=visual.dtype),
            grid_thw=torch.tensor(grids, dtype=torch.long, device=vlm.device),
        )
        emb = (out.pooler_output if hasattr(out, "pooler_output") else out).to(vlm.dtype)
        return list(emb.split([self.group_at[g][1] for g, _ in jobs]))

    @torch.no_grad()
    def logprobs(
        self, ablations: Sequence[dict[int, np.ndarray]], targets: Sequence[tuple[int, int]], batch: int = 16
    ) -> np.ndarray:
        """(B, T) log p of each target (call, token id) under each ablation ({group: (N,) bool})."""
        lm = self.vlm.model.model.language_model
        head = self.vlm.model.lm_head
        types = set(getattr(lm.config, "layer_types", None) or ["full_attention"])
        rows = torch.tensor([self.call_end[c] for c, _ in targets], device=self.vlm.device)
        ids = torch.tensor([t for _, t in targets], device=self.vlm.device)
        out = []
        for lo in range(0, len(ablations), batch):
            chunk = ablations[lo : lo + batch]
            emb = self.clean.expand(len(chunk), -1, -1).clone()
            jobs = [(b, g, tok) for b, a in enumerate(chunk) for g, tok in a.items() if np.any(tok)]
            if jobs:
                enc = self._encode_painted([(g, tok) for _, g, tok in jobs])
                for (b, g, _), e in zip(jobs, enc, strict=True):
                    s, n = self.group_at[g]
                    emb[b, s : s + n] = e
            b = len(chunk)
            h = lm(
                inputs_embeds=emb,
                position_ids=self.positions.expand(-1, b, -1),
                attention_mask={t: self.mask.expand(b, -1, -1, -1) for t in types},
                use_cache=False,
            ).last_hidden_state
            logits = head(h[:, rows]).float()  # (b, T, vocab)
            lp = logits.gather(-1, ids[None, :, None].expand(b, -1, 1))[..., 0] - torch.logsumexp(logits, -1)
            out.append(lp.cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(targets)), dtype=np.float32)


@dataclass
class _Truth:
    stream: Stream
    fps: float
    tp: int

    def group_frames(self, g: int) -> list[float]:
        return [k / self.fps for k in range(g * self.tp, (g + 1) * self.tp)]

    def shows(self, g: int, ev: Any) -> bool:
        lo, hi = ev.interval
        return any(lo <= t < hi for t in self.group_frames(g))

    def box(self, g: int, ev: Any) -> tuple[int, int, int, int]:
        t = self.group_frames(g)[-1]
        for o in self.stream.state_at(t):
            if o.obj == ev.obj:
                return o.box
        return ev.box


def _overlaps(regions: Regions, box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """(K,) bool: region covers >= OVERLAP of the box, or the box >= OVERLAP of the region."""
    lab = regions.pixel_labels(size)
    x0, y0, x1, y1 = (int(v) for v in box)
    inside = np.zeros(lab.shape, dtype=bool)
    inside[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)] = True
    k = regions.k
    area = np.bincount(lab.ravel(), minlength=k).astype(np.float64)
    hit = np.bincount(lab[inside], minlength=k).astype(np.float64)
    box_area = max(1.0, float(inside.sum()))
    return (hit >= OVERLAP * box_area) | (hit >= OVERLAP * np.maximum(area, 1.0))


def _unit_scores(
    ev: StepScores, method: str, occlusion: dict[int, np.ndarray] | None, compare: dict[str, Any]
) -> list[np.ndarray]:
    if method == "vstream":
        return list(ev.region_scores)
    if method == "raw_attention":
        return [raw_attention_scores(f) for f in ev.features]
    if method in compare:  # another estimator on the same step's features
        return [np.asarray(compare[method](f), dtype=np.float32).reshape(-1) for f in ev.features]
    return [occlusion[g] for g in ev.groups]


def evaluate_stream(
    vlm: VLM,
    stream: Stream,
    estimator: Any,
    *,
    fps: float = 2.0,
    speed: float = 1.0,
    masks: int = 16,
    max_new_tokens: int = 160,
    batch: int = 16,
    plain_first: bool | None = None,
    seed: int = 0,
    occlusion: bool = True,
    labels: list[LabeledExample] | None = None,
    compare: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One stream: the attributed run, then ablations; per-method hits and per-step LDS.
    plain_first: also replay without attribution (before or after) for the overhead ratio.
    occlusion: False skips the per-unit ablations (the occlusion method is then left out).
    labels: append one training example per span (its visible units' features, the masks
    restricted to them, the measured effects) for `train_video_estimator`.
    compare: {name: estimator} scored as more methods on the same steps' recorded features
    (choosing an estimator on validation streams costs one replay, not one per candidate)."""
    compare = {name: predictor(est) for name, est in (compare or {}).items()}
    all_methods = METHODS + tuple(compare)
    opts = dict(TRAINED)
    tp = vlm.temporal_patch_size

    def run(observer: StreamAttributor | None) -> RunResult:
        src = ShapesSource(stream, fps=fps, realtime=True, speed=speed)
        return run_paradigm(vlm, src, stream.question, "tays", max_new_tokens=max_new_tokens, observer=observer, **opts)

    plain = run(None) if plain_first is True else None
    att = StreamAttributor(estimator, keep_features=True)
    res = run(att)
    if plain_first is False:
        plain = run(None)
    if att.error is not None:
        raise RuntimeError(f"attribution failed: {att.error}") from att.error
    rec: dict[str, Any] = {
        "seed": stream.seed,
        "occlusion": bool(occlusion),
        "steps": len(res.steps),
        "tokens_per_s": res.metrics.get("decode_tokens_per_s"),
        "plain_tokens_per_s": None if plain is None else plain.metrics.get("decode_tokens_per_s"),
        "first_scores_lead_s": (res.stream_end - att.steps[0].ready) if att.steps else None,
        "compute_ms": [s.compute_ms for s in att.steps],
        "latency_ms": [(s.ready - s.end) * 1000 for s in att.steps],
        "hits": {m: {"temporal": [], "spatial": []} for m in all_methods},
        "chance": {"temporal": [], "spatial": []},
        "lds": {m: [] for m in all_methods},
    }
    steps = [s for s in att.steps if s.groups]
    if not steps:
        return rec
    frames_all = stream.frames(fps)
    frames = {
        s.index: [f for _, f in frames_all[s.index * tp : (s.index + 1) * tp]] or [frames_all[-1][1]]
        for s in att.history
        if s.kind == FRAME
    }
    tf = TeacherForcedStream(vlm, att, frames, fps)
    toks = {r.index: r.token_id for r in res.tokens}
    targets, owner = [], []
    for j, s in enumerate(steps):
        for ti, c in zip(att.step_tokens[s.step], att.step_calls[s.step], strict=True):
            targets.append((c, toks[ti]))
            owner.append(j)
    owner_a = np.array(owner)
    groups = sorted(g for g in att.regions if g in tf.group_at)
    units = [(g, k) for g in groups for k in range(att.regions[g].k)]
    token_labels = {g: att.regions[g].token_labels for g in groups}

    def per_step(lp: np.ndarray, base: np.ndarray) -> np.ndarray:  # (B, T) -> (B, S) effects
        eff = base[None, :] - lp
        return np.stack([eff[:, owner_a == j].sum(1) for j in range(len(steps))], axis=1)

    t_ab = time.perf_counter()
    base = tf.logprobs([{}], targets, batch)[0]
    occ = None
    if occlusion:
        occ_lp = tf.logprobs([{g: token_labels[g] == k} for g, k in units], targets, batch)
        occ = per_step(occ_lp, base)  # (U, S)
    rec["occlusion_s"] = time.perf_counter() - t_ab
    rng = np.random.default_rng([seed, stream.seed])
    mask_units = []
    for _ in range(masks):
        chosen = [g for g in groups if rng.random() < 0.5] or [groups[int(rng.integers(len(groups)))]]
        mask_units.append({g: rng.random(att.regions[g].k) < 0.5 for g in chosen})
    abl = [{g: r[token_labels[g]] for g, r in m.items()} for m in mask_units]
    t_ab = time.perf_counter()
    measured = per_step(tf.logprobs(abl, targets, batch), base)  # (M, S)
    rec["masks_s"] = time.perf_counter() - t_ab

    truth = _Truth(stream, fps, tp)
    src_events = ShapesSource(stream, fps=fps).events
    unit_index = {u: i for i, u in enumerate(units)}
    methods = all_methods if occlusion else tuple(m for m in all_methods if m != "occlusion")
    for j, s in enumerate(steps):
        if labels is not None:
            labels.append(_example(stream.seed, j, s, mask_units, measured[:, j], base[owner_a == j].sum()))
        occ_scores = None
        if occ is not None:
            occ_scores = {g: occ[[unit_index[(g, k)] for k in range(att.regions[g].k)], j] for g in s.groups}
        for m in methods:
            scores = _unit_scores(s, m, occ_scores, compare)
            pred = np.array(
                [sum(float(sc[mk[g]].sum()) for g, sc in zip(s.groups, scores) if g in mk) for mk in mask_units]
            )
            if np.ptp(measured[:, j]) > 1e-6:
                rec["lds"][m].append(lds([pred], [measured[:, j]]))
        ev_truth = match_event(s.text, s.end * speed, src_events)
        if ev_truth is None:
            continue
        ev = stream.events[src_events.index(ev_truth)]
        shows = [truth.shows(g, ev) for g in s.groups]
        rec["chance"]["temporal"].append(sum(shows) / len(shows))
        size = frames[s.groups[0]][-1].size
        overlap = {g: _overlaps(att.regions[g], truth.box(g, ev), size) for g in s.groups}
        rec["chance"]["spatial"].append(float(np.mean([overlap[g].mean() for g in s.groups])))
        for m in methods:
            scores = _unit_scores(s, m, occ_scores, compare)
            gi = int(np.argmax([sc.sum() for sc in scores]))
            g = s.groups[gi]
            rec["hits"][m]["temporal"].append(bool(shows[gi]))
            rec["hits"][m]["spatial"].append(bool(overlap[g][int(np.argmax(scores[gi]))]))
    return rec


def _example(
    seed: int, j: int, s: StepScores, mask_units: list[dict[int, np.ndarray]], effects: np.ndarray, base: float
) -> LabeledExample:
    """One span as a vSTREAM training example: its visible (group, region) units are the regions."""
    feats = np.concatenate(s.features)  # (U_s, L*H)
    masks = np.stack(
        [
            np.concatenate([m.get(g, np.zeros(len(f), dtype=bool)) for g, f in zip(s.groups, s.features)])
            for m in mask_units
        ]
    )
    return LabeledExample(
        index=j,
        seed=int(seed),
        family="video",
        features=torch.from_numpy(feats[None]).float(),
        masks=torch.from_numpy(masks),
        effects=torch.from_numpy(np.asarray(effects, dtype=np.float32)[:, None]),
        base=torch.tensor([float(base)]),
        assignment=torch.zeros(feats.shape[0], 1, dtype=torch.uint8),
        tokens=torch.zeros(0, dtype=torch.long),
        span_texts=[s.text],
    )


def _mean(xs: Sequence[float]) -> float | None:
    xs = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    return sum(xs) / len(xs) if xs else None


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool per-stream records: every narrated step and every span counts once."""

    def pool(key: str, m: str) -> list:
        return [x for r in records for x in r["hits"][m][key]]

    methods = list(dict.fromkeys(m for r in records for m in r["hits"])) or list(METHODS)

    ratios = [
        r["tokens_per_s"] / r["plain_tokens_per_s"]
        for r in records
        if r.get("plain_tokens_per_s") and r.get("tokens_per_s")
    ]
    lat = [x for r in records for x in r["latency_ms"]]
    comp = [x for r in records for x in r["compute_ms"]]
    leads = [r["first_scores_lead_s"] for r in records if r["first_scores_lead_s"] is not None]
    return {
        "streams": len(records),
        "steps": sum(r["steps"] for r in records),
        "narrated_steps": len(pool("temporal", "vstream")),
        "lds_spans": len([x for r in records for x in r["lds"]["vstream"]]),
        "temporal_pointing": {m: _mean(pool("temporal", m)) for m in methods},
        "spatial_pointing": {m: _mean(pool("spatial", m)) for m in methods},
        "lds": {m: _mean([x for r in records for x in r["lds"][m]]) for m in methods},
        "occlusion_streams": sum(1 for r in records if r.get("occlusion")),
        "chance": {
            "temporal_pointing": _mean([x for r in records for x in r["chance"]["temporal"]]),
            "spatial_pointing": _mean([x for r in records for x in r["chance"]["spatial"]]),
        },
        "overhead_ratio": float(np.median(ratios)) if ratios else None,
        "overhead_pairs": len(ratios),
        "score_latency_ms_p50": float(np.percentile(lat, 50)) if lat else None,
        "score_latency_ms_p95": float(np.percentile(lat, 95)) if lat else None,
        "score_compute_ms_p50": float(np.percentile(comp, 50)) if comp else None,
        "first_scores_during_stream": _mean([float(x > 0) for x in leads]),
    }


def _job(job: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """One process of --workers: loads the model and estimator, replays streams w, w + W, ..."""
    torch.set_num_threads(1)
    vlm = load_vlm(job["model"])
    # the still-image estimator was trained on the demo model, which the TaYS model fine-tunes
    est = load_estimator(job["estimator"], vlm, allow_model_mismatch=True) if job["estimator"] else None
    compare = {name: load_estimator(path, vlm, allow_model_mismatch=True) for name, path in job["compare"].items()}
    out = []
    for i in range(job["worker"], job["n"], job["workers"]):
        stream = streams(job["split"], job["start"] + i, 1)[0]
        labels: list[LabeledExample] | None = [] if job["labels_out"] else None
        plain = (i % 2 == 0) if i < job["overhead_streams"] else None
        rec = evaluate_stream(
            vlm,
            stream,
            est,
            plain_first=plain,
            occlusion=i < job["occlusion_streams"],
            labels=labels,
            compare=compare,
            **job["kw"],
        )
        if labels:
            save_labels(labels, Path(job["labels_out"]) / f"video-labels-{stream.seed}.safetensors")
        out.append((i, rec))
        _log(
            f"[{i + 1}/{job['n']}] seed {stream.seed}: {rec['steps']} steps, "
            f"{len(rec['hits']['vstream']['temporal'])} narrated, lds spans {len(rec['lds']['vstream'])}"
        )
    return out


def evaluate_streams(
    model: str,
    estimator: str | None,
    n: int = 100,
    start: int = 0,
    split: str = "heldout",
    overhead_streams: int = 10,
    occlusion_streams: int | None = None,
    workers: int = 1,
    labels_out: str | None = None,
    compare: Sequence[str] = (),
    **kw: Any,
) -> dict[str, Any]:
    """`evaluate_stream` over `n` streams of `split` in `workers` processes (each replays in real
    time; they share the CPU). The first `overhead_streams` are also replayed without
    attribution; the first `occlusion_streams` (default all) get the occlusion baseline.
    `compare`: more estimator files, each scored as a method named after its file (its stem)."""
    names = {}
    for path in compare:
        name = Path(path).stem
        if name in METHODS or name in names:
            raise VLMError(f"--compare: two methods would be named {name!r}; rename the file {path}")
        names[name] = str(path)
    t = time.perf_counter()
    base = {
        "model": model,
        "estimator": estimator,
        "n": n,
        "start": start,
        "split": split,
        "workers": workers,
        "overhead_streams": overhead_streams,
        "occlusion_streams": n if occlusion_streams is None else occlusion_streams,
        "labels_out": labels_out,
        "compare": names,
        "kw": kw,
    }
    if labels_out:
        Path(labels_out).mkdir(parents=True, exist_ok=True)
    jobs = [dict(base, worker=w) for w in range(workers)]
    if workers == 1:
        parts = [_job(jobs[0])]
    else:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            parts = list(pool.map(_job, jobs))
    recs = [r for _, r in sorted((x for part in parts for x in part), key=lambda x: x[0])]
    out = summarize(recs)
    out.update(model=model, estimator=estimator, split=split, seconds=time.perf_counter() - t)
    return out


def save_labels(examples: list[LabeledExample], path: Path) -> Path:
    """One stream's span examples as safetensors (tensors) + JSON header (texts, seeds)."""
    tensors: dict[str, torch.Tensor] = {}
    for i, ex in enumerate(examples):
        tensors[f"e{i}.features"] = ex.features.float().contiguous()
        tensors[f"e{i}.masks"] = ex.masks.bool().contiguous()
        tensors[f"e{i}.effects"] = ex.effects.float().contiguous()
        tensors[f"e{i}.base"] = ex.base.float().contiguous()
    meta = [{"seed": ex.seed, "index": ex.index, "text": (ex.span_texts or [""])[0]} for ex in examples]
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": LABELS_FORMAT, "examples": json.dumps(meta)})
    tmp.replace(path)
    return path


def load_video_labels(dirs: Sequence[str | Path]) -> list[LabeledExample]:
    """Every span example in the folders' video-label files (safetensors only)."""
    out = []
    for d in dirs:
        for f in sorted(Path(d).glob("video-labels-*.safetensors")):
            with safe_open(str(f), framework="pt") as fh:
                header = fh.metadata() or {}
                if header.get("format") != LABELS_FORMAT:
                    continue
                meta = json.loads(header["examples"])
                for i, m in enumerate(meta):
                    feats = fh.get_tensor(f"e{i}.features")
                    out.append(
                        LabeledExample(
                            index=len(out),
                            seed=int(m["seed"]),
                            family="video",
                            features=feats,
                            masks=fh.get_tensor(f"e{i}.masks"),
                            effects=fh.get_tensor(f"e{i}.effects"),
                            base=fh.get_tensor(f"e{i}.base"),
                            assignment=torch.zeros(feats.shape[1], 1, dtype=torch.uint8),
                            tokens=torch.zeros(0, dtype=torch.long),
                            span_texts=[m["text"]],
                        )
                    )
    return out


def train_video_estimator(
    label_dirs: Sequence[str | Path], out: str | Path, vlm: VLM | None = None, **kw: Any
) -> tuple[LinearEstimator, dict[str, Any]]:
    """vSTREAM's estimator training (`vstream.attr.estimator.train`) on video span examples."""
    examples = load_video_labels(label_dirs)
    if not examples:
        raise VLMError(f"no video labels in {', '.join(str(d) for d in label_dirs)}")
    L = H = None
    if vlm is not None:
        L, H = int(vlm.num_layers), int(vlm.num_heads)
    est, report = train(examples, num_layers=L, num_heads=H, **kw)
    if vlm is not None:
        est.meta.update(model_identity(vlm))
    est.meta["labels"] = "video (tays attribute-labels)"
    est.save(out)
    report["spans"] = len(examples)
    return est, report
