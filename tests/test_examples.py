"""The gallery knows each example's ground truth and recognises its images."""

import numpy as np
from PIL import Image

from vstream.world.examples import answer_verdict, example_truth, scene_examples


def test_every_example_carries_its_truth():
    rows = scene_examples()
    assert rows
    for path, question, shown in rows:
        truth = example_truth(Image.open(path), question)
        assert truth is not None and shown == f"{truth['answer']} · {truth['family']}"


def test_other_images_and_questions_are_not_examples():
    path, question, _ = scene_examples()[0]
    img = Image.open(path).convert("RGB")
    assert example_truth(img, question + " Really?") is None
    arr = np.asarray(img).copy()
    arr[0, 0] = 255 - arr[0, 0]
    assert example_truth(Image.fromarray(arr), question) is None


def test_verdict_compares_normalised_answers():
    assert answer_verdict({"answer": "red"}, " Red.").startswith("✓ right")
    assert answer_verdict({"answer": "red"}, "blue").startswith("✗ wrong")


def test_the_page_says_whether_an_example_was_answered_right():
    from ui.explorer import example_verdict

    path, question, _ = scene_examples()[0]
    truth = example_truth(Image.open(path), question)["answer"]
    assert example_verdict(Image.open(path), question, truth).startswith("✓ right")
    assert example_verdict(Image.open(path), question, "no idea").startswith("✗ wrong")
    assert example_verdict(Image.new("RGB", (448, 448)), question, truth) == ""


def test_dynamics_readout_shows_the_risk_with_its_heldout_auc():
    from ui.figures import dynamics_markdown

    md = dynamics_markdown(0.5, 1.2, "stable", 3, risk=0.42, risk_auc={"0.3": 0.71})
    assert "42%" in md and "0.71" in md
    assert "risk" not in dynamics_markdown(0.5, 1.2, "stable", 3).lower()
