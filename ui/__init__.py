"""The explorer's UI-only helpers (per-session run records, readouts, figures, the annotation
store). `app.py` wires them and the libraries to the page; nothing here imports Gradio."""
