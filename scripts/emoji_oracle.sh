#!/usr/bin/env bash
# The retrained references ("oracles", issue 27): the emoji world's UNet trained with the shipped
# model's recipe (seed 3, batch 32, lr 2e-4 constant after 500 warm-up steps, EMA 0.999, 8000 steps:
# the shipped UNet is the step-8000 export of scripts/emoji_train.sh) on a stream that leaves out the
# pictures of one concept list of src/sculpt/emoji/assets/lists.yaml. The VAE is the shipped one
# (its fp16 weights, in fp32). Exported as src/sculpt/emoji/weights/oracle-<list>/pipeline (fp16),
# loadable as the model `emoji-oracle-<list>`.
#
#   OMP_NUM_THREADS=1 nohup scripts/emoji_oracle.sh sealed > oracle-sealed.log 2>&1 &
#
# Resumable: the run folder ($RUNS/oracle-<list>, outside the work tree by default) holds a checkpoint
# written every few minutes; run the same command again to go on.
set -euo pipefail
cd "$(dirname "$0")/.."
LIST=${1:?usage: scripts/emoji_oracle.sh LIST (sealed, targets, ...)}
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-${SCULPT_CACHE:-$HOME/.cache/sculpt}/oracle_train}
STEPS=${STEPS:-8000}
export HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE
mkdir -p "$RUNS"
$PY -m sculpt.emoji.train unet --out "$RUNS/oracle-$LIST" --vae src/sculpt/emoji/weights/pipeline/vae \
    --steps "$STEPS" --batch 32 --lr 2e-4 --ema-decay 0.999 --export-every 2000 --seed 3 \
    --leave-out "$LIST" --export-dir "src/sculpt/emoji/weights/oracle-$LIST" \
    2>&1 | tee -a "$RUNS/oracle-$LIST.log"
