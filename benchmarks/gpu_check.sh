#!/usr/bin/env bash
# The training step at the scale users work at, on one CUDA GPU, in one run (< 8 minutes):
# ViT-B/16 LocalMIM-HOG at batch 256, eager bf16 and compiled bf16 against the published eager
# path (fp16 autocast, HOG per scale and per colour channel), then the loader over a folder of
# JPEGs made from the sample photos, feeding the compiled step.
#
#   bash benchmarks/gpu_check.sh [extra `localmim benchmark` flags, e.g. --set data.workers=8]
#
# Writes gpu_check.json (the benchmark's --json) into $OUT (or benchmarks/out) and prints a summary.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT_DIR=${OUT:-benchmarks/out}
mkdir -p "$OUT_DIR"
DATA=$(mktemp -d)
trap 'rm -rf "$DATA"' EXIT

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# 1024 JPEGs at photo sizes (the 7 sample photos, each crop and flip its own file).
"$PY" - "$DATA" <<'PYEOF'
import sys
from pathlib import Path
from PIL import Image, ImageOps
from localmim_cli.data.sample_photos import sample_photo_paths
out = Path(sys.argv[1])
photos = [Image.open(p).convert("RGB") for p in sample_photo_paths()]
for i in range(1024):
    img = photos[i % len(photos)]
    w, h = img.size
    k = i // len(photos)
    box = (k % 7 * w // 40, k % 5 * h // 30, w - k % 3 * w // 40, h - k % 4 * h // 30)
    crop = img.crop(box)
    crop = ImageOps.mirror(crop) if k % 2 else crop
    crop.thumbnail((640, 640))
    (out / f"{i // 128:02d}").mkdir(exist_ok=True)
    crop.save(out / f"{i // 128:02d}" / f"{i:05d}.jpg", quality=90)
print(f"{len(list(out.rglob('*.jpg')))} JPEGs in {out}")
PYEOF

WORKERS=$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))
timeout 450 "$PY" -m localmim_cli benchmark "$DATA" --preset vit-b16-hog-1600ep --device cuda \
    --batch-size 256 --precision bf16 --compile default --steps 20 --warmup 3 \
    --set data.workers="$WORKERS" "$@" --json > "$OUT_DIR/gpu_check.json"

"$PY" - "$OUT_DIR/gpu_check.json" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{r['device_name']}, torch {r['torch']}, batch {r['batch_size']}, median of {r['steps']} steps")
for key in ("baseline", "eager", "configured"):
    e = r[key]
    name = {"baseline": f"published eager ({e['precision']}, per-channel HOG)", "eager": "eager bf16",
            "configured": f"compiled bf16 ({e.get('compile')})"}[key]
    print(f"  {name:42s} {e['img_per_s']:8.1f} img/s {e['step_ms']:8.1f} ms "
          f"{e['peak_memory_bytes'] / 2**30:6.2f} GiB {e['tflops']:6.1f} TFLOP/s")
base = r["baseline"]["img_per_s"]
print(f"  eager bf16 / published: {r['eager']['img_per_s'] / base:.2f}x;  compiled bf16 / published: "
      f"{r['vs_baseline']['img_per_s']:.2f}x;  compiled / eager: {r['vs_eager']['img_per_s']:.2f}x")
d = r.get("data")
if d:
    print(f"  loader ({d['images']} JPEGs, {d['workers']} workers): {d['loader_img_per_s']:.0f} img/s alone, "
          f"{d['loader_over_step']:.2f}x the compiled step; fed: {d['fed_img_per_s']:.0f} img/s, "
          f"{100 * d['data_wait_share']:.0f}% waiting for data")
PYEOF
