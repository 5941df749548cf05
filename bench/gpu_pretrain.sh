#!/usr/bin/env bash
# Issue 14 on a GPU: two pretraining runs side by side on the one GPU, data generated on this machine's own CPUs
# (the stream's background threads in the DataLoader workers):
#   1. the demo recipe (configs/pretrain_stream.json: streamed phantom subjects, two appearances per sample, random
#      crop spacing 2-4 mm, tiny ViT) for P14_STEPS steps;
#   2. the authors' recipe (configs/pretrain_authors.json: paper backbone, one 128^3 view at 1-2 mm, 8192
#      prototypes, lr 1e-3, teacher temperature 0.04 -> 0.07 over the first third) for P14_AUTHORS_STEPS steps;
# both select their checkpoint by registration on the validation cohort (role seed 14003, 4 mm) every P14_VAL_EVERY
# steps (RUN/val_log.csv, RUN/best_backbone.*); then the streamed config's steps/s on this machine.
# Output: $OUT/p14_runs.tgz (logs, configs, best and last teacher weights), $OUT/pretrain_speed_gpu_p14.csv and
# lines in $OUT/session.log.
#
# Usage: OUT=/tmp/out bash bench/gpu_pretrain.sh      (DEVICE, P14_STEPS, P14_AUTHORS_STEPS, P14_VAL_EVERY override)
set -u
OUT=${OUT:-/tmp/dinoreg_gpu_out}
WORK=${WORK:-/tmp/dinoreg_gpu}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT" "$WORK"
if [ -z "${PY:-}" ]; then
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
  fi
  PY=python3
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
P14=$WORK/p14
mkdir -p "$P14"
T0=$(date +%s)
$PY -c "from dinoreg_core.data.cohorts import generate_role_cohort as g; g('$P14/val', 'validation', 4, spacing_mm=4.0, shape=(96, 78, 84), workers=8, progress=False)"
VAL=(--set "val.every=${P14_VAL_EVERY:-500}" --set "val.data=$P14/val" --set "val.register={\"device\": \"$DEVICE\"}")
$PY -m dinoreg_core.cli pretrain --config stream --data stream --out "$P14/stream" --no-progress --set device=$DEVICE \
  --set steps=${P14_STEPS:-5000} --set num_workers=6 --set stream.gen_threads=3 --set snapshot_every=0 "${VAL[@]}" \
  > "$P14/stream.out" 2>&1 &
$PY -m dinoreg_core.cli pretrain --config authors --data stream --out "$P14/authors" --no-progress --set device=$DEVICE \
  --set steps=${P14_AUTHORS_STEPS:-3000} --set teacher_temp_warmup_steps=$(( ${P14_AUTHORS_STEPS:-3000} / 3 )) \
  "${VAL[@]}" > "$P14/authors.out" 2>&1 &
wait
echo "p14 pretraining took $(( $(date +%s) - T0 )) s" | tee -a "$OUT/session.log"
for r in stream authors; do tail -2 "$P14/$r.out" | sed "s/^/p14 $r: /" | tee -a "$OUT/session.log"; done
$PY bench/pretrain_speed.py --device "$DEVICE" --config stream --steps 40 --skip 10 --workers 6 --threads 4 \
  --set stream.pool_size=8 stream.new_every=16 --out "$OUT/pretrain_speed_gpu_p14.csv" 2>&1 | tail -2 | tee -a "$OUT/session.log"
tar czf "$OUT/p14_runs.tgz" -C "$P14" --exclude checkpoint.pt --exclude snapshots --exclude tensorboard stream authors