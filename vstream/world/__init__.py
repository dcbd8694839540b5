"""The demo world: procedural shapes scenes and video streams with known truth (`shapes`,
`shapes_video`), the tiny Qwen2.5-VL demo model, its tokenizer and trainer, and `eval_model`.

Stands on `vstream.model` only; attribution (`vstream.attr`) and `tays` build on it.
"""
