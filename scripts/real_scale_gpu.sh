#!/usr/bin/env bash
# The real-scale table on one GPU, random weights at the published sizes (bf16):
#   bash scripts/real_scale_gpu.sh [OUT_DIR]
# Each model is built in GPU memory (nothing downloaded, nothing written but JSON). Per model and
# trace length, `python -m vstream bench --random-init` runs plain decoding and live attribution
# to that length, then occlusion and input x gradient on the trace (see vstream/attr/scale.py).
# Decoding dominates: about 2 x (sum of lengths) tokens per model. At ~25-35 ms per token for a
# 7-9 B model with transformers' generate (batch 1), the default below is about 4 minutes for
# Qwen2.5-VL-7B and 2 minutes for each other model; LENGTHS_7B="512 1024 2048 4096 8192" adds
# about 15 minutes. Each command has its own timeout, so one slow model does not eat the rest.
set -uo pipefail
out=${1:-runs/real-scale}
mkdir -p "$out"
LENGTHS_7B=${LENGTHS_7B:-"512 1024 2048"}
LENGTHS=${LENGTHS:-"512 1024"}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.csv" 2>&1
python -c "import torch, transformers; print(torch.__version__, transformers.__version__)" > "$out/versions.txt"
run() {  # name, lengths, timeout seconds
  timeout "$3" python -m vstream bench --random-init "$1" --lengths $2 --json \
    > "$out/vstream-$1.json" 2> "$out/vstream-$1.err"
  echo "$1: exit $? ($(tail -c 300 "$out/vstream-$1.json" | tr -d '\n' | cut -c1-200))"
}
run qwen2.5-vl-7b "$LENGTHS_7B" 420
for name in glm-4.1v-9b qwen3-vl-8b qwen2.5-vl-3b; do run "$name" "$LENGTHS" 240; done
timeout 240 python -m tays bench --random-init qwen2.5-vl-7b --lengths $LENGTHS --json \
  > "$out/tays-qwen2.5-vl-7b.json" 2> "$out/tays-qwen2.5-vl-7b.err"
echo "tays qwen2.5-vl-7b: exit $?"
