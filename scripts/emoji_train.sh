#!/usr/bin/env bash
# Train the emoji world from scratch on CPU: classifier -> scorer -> VAE -> UNet, each exported into
# src/sculpt/emoji/weights/ as soon as it finishes (the UNet also every 2000 steps).
#
#   nohup scripts/emoji_train.sh > .cache/emoji_train/all.log 2>&1 &
#
# Resumable: run it again after an interruption and every stage continues from its latest checkpoint
# (finished stages are skipped; `python -m sculpt.emoji.train export STAGE --out DIR` re-exports one).
# To train the UNet longer, rerun with a larger UNET_STEPS (its learning rate is constant after warmup,
# so extending a finished run is sound).
#
# Wall time measured on 2 CPU cores shared with other jobs (about half of them free; alone is ~2x faster):
# classifier 1500 steps ~10 min, scorer 1500 steps ~18 min, VAE 2000 steps ~27 min,
# UNet 320-540 ms/step at batch 32 (~180 ms alone), plus ~15-40 s per export every 2000 steps.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-.cache/emoji_train}
VAE_STEPS=${VAE_STEPS:-2000}
UNET_STEPS=${UNET_STEPS:-30000}
export HF_HUB_OFFLINE=1
# The CPU is shared; idle OpenMP threads should sleep rather than spin against other processes.
export OMP_WAIT_POLICY=PASSIVE
mkdir -p "$RUNS"

$PY -m sculpt.emoji.train classifier --out "$RUNS/classifier" --steps 1500 --batch 128 --lr 2e-3 --seed 0 \
    2>&1 | tee -a "$RUNS/classifier.log"
$PY -m sculpt.emoji.train scorer --out "$RUNS/scorer" --steps 1500 --batch 128 --lr 1e-3 --seed 1 \
    2>&1 | tee -a "$RUNS/scorer.log"
$PY -m sculpt.emoji.train vae --out "$RUNS/vae" --steps "$VAE_STEPS" --batch 64 --lr 1e-3 --kl-weight 1e-6 --seed 2 \
    2>&1 | tee -a "$RUNS/vae.log"
$PY -m sculpt.emoji.train unet --out "$RUNS/unet" --vae "$RUNS/vae" --steps "$UNET_STEPS" --batch 32 --lr 2e-4 \
    --ema-decay 0.999 --export-every 2000 --seed 3 \
    2>&1 | tee -a "$RUNS/unet.log"
