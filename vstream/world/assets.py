"""Where the repository keeps what ships with it: weights in `assets/`, rendered `examples/`."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "assets"
EXAMPLES_DIR = ROOT / "examples"
DEMO_MODEL_DIR = ASSETS / "demo-model"
TAYS_MODEL_DIR = ASSETS / "tays-model"
DEMO_ESTIMATOR = ASSETS / "estimator-demo.safetensors"
# the same labels with the paper's mean features: what attribution while watching computes per frame
DEMO_ESTIMATOR_MEAN = ASSETS / "estimator-demo-mean.safetensors"
VIDEO_ESTIMATOR = ASSETS / "estimator-video.safetensors"  # the TaYS model's, on video labels
# what attribution while watching scores steps with, in order of preference
WATCHING_ESTIMATORS = (VIDEO_ESTIMATOR, DEMO_ESTIMATOR_MEAN)
RISK_MODEL = ASSETS / "risk-demo.json"  # failure-risk classifier over reasoning dynamics
RUNS_DIR = ROOT / "runs"


def watching_estimator() -> Path:
    """The first of `WATCHING_ESTIMATORS` that is there (the still-image fallback otherwise)."""
    return next((p for p in WATCHING_ESTIMATORS if p.is_file()), DEMO_ESTIMATOR_MEAN)
