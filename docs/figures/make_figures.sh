#!/usr/bin/env bash
# The README's "Seeing inside" figures: train a small ViT on CIFAR-10, then draw every figure from it.
#
#   bash docs/figures/make_figures.sh [CIFAR10_ROOT]      # default: ../shared/data/cifar10
#   CKPT=runs/bench_cifar10_30min/best.safetensors bash docs/figures/make_figures.sh   # draw from a trained run
#
# The README's figures are drawn from the best checkpoint of the 30-minute CIFAR-10 run
# (benchmarks/cifar10_time_to_accuracy.py: width 128, depth 6, 62.3% test top-1).
#
# Model: 32 px images, 4 px patches (8x8 = 64 tokens), width 64, depth 6, 4 heads, MLP 128.
# Training: AdamW lr 2e-3, batch 128, crop scale 0.8-1 + flips, 1 epoch (390 steps).
# On a shared 2-core CPU (load ~10): 26 minutes of training, test top-1 42.5%; the figures take a minute.
set -euo pipefail
ROOT="${1:-../shared/data/cifar10}"
RUN=runs/cifar10_seeing
OUT=docs/figures
VITKIT="${VITKIT:-.venv/bin/vitkit}"

[ -n "${CKPT:-}" ] || "$VITKIT" train --config digits_vit \
  --set data.dataset=imagefolder --set data.root="$ROOT" --set data.img_size=32 \
  --set data.batch_size=128 --set data.num_workers=1 --set data.hflip=0.5 --set 'data.scale=[0.8,1.0]' \
  --set model.name=vit_tiny_patch4_32 --set model.overrides.patch_size=4 --set model.overrides.embed_dim=64 \
  --set model.overrides.depth=6 --set model.overrides.num_heads=4 --set model.overrides.mlp_dim=128 \
  --set optim.lr=2e-3 --set optim.warmup_epochs=0.3 --set train.epochs=1 --set train.num_threads=2 \
  --set train.checkpoint_every=100 --set eval.every=1 --set train.out_dir="$RUN"

CKPT="${CKPT:-$RUN/last.safetensors}"
"$VITKIT" plot pos-embed "$CKPT" --out "$OUT/cifar10_pos_embed.png"
"$VITKIT" plot filters "$CKPT" --num-components 16 --out "$OUT/cifar10_filters.png"
"$VITKIT" plot attention-distance "$CKPT" "$ROOT/test" --max-images 256 --out "$OUT/cifar10_attention_distance.png"
"$VITKIT" plot attention "$CKPT" "$ROOT/test/ship/0000.jpg" --out "$OUT/cifar10_attention.png"
"$VITKIT" draw vit_small_patch16_18x2_224 --out "$OUT/vit_small_patch16_18x2_224"
