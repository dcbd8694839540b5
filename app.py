"""Gradio explorer for vision-language thinking models.

This first version wires the reasoning stream of the VLM adapter to a page; live attributions
(vSTREAM) and the video tab (TaYS) plug into the same layout as they land.

    python app.py                       # embedded demo model on http://127.0.0.1:7860
    python app.py --model Qwen/Qwen2.5-VL-3B-Instruct --host 0.0.0.0 --share
"""
from __future__ import annotations

import argparse
import json
import os
import threading
from functools import lru_cache
from pathlib import Path

import gradio as gr

from vstream.demo_model import DEMO_MODEL_DIR
from vstream.examples import EXAMPLES_DIR
from vstream.images import VLMError
from vstream.vlm import VLM, load_vlm

MAX_QUESTION_CHARS = 2000
_load_lock = threading.Lock()


@lru_cache(maxsize=2)
def _model(name: str) -> VLM:
    return load_vlm(name)


def get_model(name: str) -> VLM:
    name = (name or "").strip() or str(DEMO_MODEL_DIR)
    with _load_lock:  # two first requests must not load the same model twice
        return _model(name)


def example_rows() -> list[list[str]]:
    index = EXAMPLES_DIR / "index.json"
    if not index.exists():
        return []
    data = json.loads(index.read_text())
    return [[str(EXAMPLES_DIR / s["file"]), s["question"]] for s in data["scenes"]]


def reason(image, question: str, model_name: str):
    """Stream the model's thinking and answer as markdown."""
    question = (question or "").strip()
    if image is None:
        raise gr.Error("Pick an example or upload an image first.")
    if not question:
        raise gr.Error("Type a question about the image.")
    if len(question) > MAX_QUESTION_CHARS:
        raise gr.Error(f"The question is {len(question)} characters long; the limit is {MAX_QUESTION_CHARS}.")
    try:
        vlm = get_model(model_name)
        inputs = vlm.build_inputs(question, image=image)
    except VLMError as e:
        raise gr.Error(str(e)) from None
    text = ""
    for _, piece in vlm.stream(inputs, max_new_tokens=256):
        text += piece
        yield _format(text, done=False)
    yield _format(text, done=True)


def _format(text: str, done: bool) -> str:
    thinking, _, answer = text.partition("</think>")
    thinking = thinking.replace("<think>", "").strip()
    out = f"**Thinking**\n\n{thinking}{'' if done or answer else ' ▍'}"
    if answer or done:
        out += f"\n\n**Answer:** {answer.strip() or '(none)'}"
    return out


def build_ui(default_model: str) -> gr.Blocks:
    with gr.Blocks(title="Thinking-VLM Explorer") as demo:
        gr.Markdown(
            "# Thinking-VLM Explorer\nAsk a question about an image and watch the model think. "
            "The default is a tiny Qwen2.5-VL-architecture model trained on our procedural shapes world; "
            "any Qwen2.5-VL / Qwen3-VL id or folder works where weights are available."
        )
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", label="Image", height=320)
                question = gr.Textbox(label="Question", placeholder="What color is the circle?")
                model_name = gr.Textbox(label="Model (Hugging Face id or folder)", value=default_model)
                run = gr.Button("Run", variant="primary")
            with gr.Column():
                output = gr.Markdown(label="Reasoning")
        rows = example_rows()
        if rows:
            gr.Examples(rows, inputs=[image, question], label="Shapes-world examples")
        run.click(reason, [image, question, model_name], output, api_name="reason", concurrency_limit=2)
        question.submit(reason, [image, question, model_name], output, concurrency_limit=2)
    return demo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    ap.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    ap.add_argument("--share", action="store_true", default=os.environ.get("VSTREAM_SHARE") == "1")
    ap.add_argument("--model", default=os.environ.get("VSTREAM_MODEL", str(DEMO_MODEL_DIR)))
    args = ap.parse_args()
    if not Path(args.model).exists() and args.model == str(DEMO_MODEL_DIR):
        raise SystemExit(f"error: the demo model is missing at {DEMO_MODEL_DIR}; train it with python -m vstream train-demo")
    build_ui(args.model).queue(default_concurrency_limit=2).launch(
        server_name=args.host, server_port=args.port, share=args.share
    )


if __name__ == "__main__":
    main()
