#!/usr/bin/env bash
# One prepared GPU session (run through the workplace's `device` tool, or by hand on any CUDA machine):
#
#   1. benchmarks: pretraining steps/s and peak memory of the paper config at 128^3 with bf16
#      (bench/pretrain_speed.py) and full-volume dense-feature extraction time up to 192x160x256
#      (bench/features_dino3d.py);
#   2. a collapse sweep of the demo pretraining: the demo config and variants of its teacher-target
#      settings, run side by side on the demo cohort (synthetic, seed 1000, 16 subjects CT+MR), so the
#      collapse monitors of each can be compared (results/pretrain/sweep_gpu/).
#
#   3. one whole registration pair per feature method at 192x160x256 (bench/gpu_end_to_end.py).
#
# Usage: OUT=/tmp/out bash bench/gpu_session.sh        (SWEEP_STEPS, DEVICE, BENCH=0/1, E2E=0/1, E2E_ONLY=1,
#                                                       WORKERS override)
#   the end-to-end pairs alone (a few minutes): BENCH=0 E2E_ONLY=1 OUT=/tmp/out bash bench/gpu_session.sh
# Needs python3 with torch + CUDA; nibabel is installed from .whl/ when that folder exists (the device
# machine has no package index). Everything it writes lands in $OUT (at most 8 files).
set -u
OUT=${OUT:-/tmp/dinoreg_gpu_out}
SWEEP_STEPS=${SWEEP_STEPS:-1500}
DEVICE=${DEVICE:-cuda}
BENCH=${BENCH:-1}
WORKERS=${WORKERS:-2}
WORK=${WORK:-/tmp/dinoreg_gpu}
mkdir -p "$OUT" "$WORK/sweep"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
PY=${PY:-python3}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } | tee "$OUT/session.log"

# the demo cohort, generated here (deterministic in its seed) while the benchmarks use the GPU
$PY -m dinoreg_core.cli data generate-phantoms --out "$WORK/cohort" --n-subjects 16 --seed 1000 --workers 8 \
  --set mr_fraction=1.0 --no-progress > "$WORK/cohort.log" 2>&1 &
GEN=$!

if [ "$BENCH" = 1 ]; then
  T0=$(date +%s)
  $PY bench/pretrain_speed.py --device "$DEVICE" --threads 4 --workers 12 --steps 12 --skip 4 --head-out-dim 8192 \
    --cases paper:128:48:8:2 paper:128:48:8:8 --out "$OUT/pretrain_speed_gpu.csv" 2>&1 | grep -v "^pretrain" | tee -a "$OUT/session.log"
  $PY bench/features_dino3d.py --device "$DEVICE" --configs tiny paper --modes full --max-seconds 120 \
    --sizes 96x96x96 128x128x128 192x160x192 192x160x256 --out "$OUT/features_dino3d_gpu.csv" 2>&1 | tail -12 | tee -a "$OUT/session.log"
  echo "benchmarks took $(( $(date +%s) - T0 )) s" | tee -a "$OUT/session.log"
fi
# one whole pair per feature method at 192x160x256 (load, features, PCA, ConvexAdam, warp, metrics; bf16 where it
# applies; peak GPU memory), bench/gpu_end_to_end.py; E2E=0 skips it, E2E_ONLY=1 stops after it
if [ "${E2E:-1}" = 1 ]; then
  T0=$(date +%s)
  $PY bench/gpu_end_to_end.py --device "$DEVICE" --threads 4 --out "$OUT/gpu_end_to_end.csv" 2>&1 | tail -12 \
    | tee -a "$OUT/session.log"
  echo "end-to-end pairs took $(( $(date +%s) - T0 )) s" | tee -a "$OUT/session.log"
  if [ "${E2E_ONLY:-0}" = 1 ]; then kill $GEN 2>/dev/null; ls -la "$OUT"; exit 0; fi
fi
wait $GEN || { echo "cohort generation failed:"; cat "$WORK/cohort.log"; exit 1; }

# the sweep: name and --set overrides of the demo config (every run: same seed, same data, same step count)
# (SWEEP=2: after the first sweep showed every variant of the teacher targets collapsing: views from one region,
#  a separate iBOT head, stronger residual branches at init (LayerScale 1.0), no DINO cls loss)
MO_LS1='model_overrides={"pos_grid":[8,8,8],"layerscale_init":1.0}'
if [ "${SWEEP:-2}" = 1 ]; then
declare -A RUNS=(
  [c0_demo]=""
  [c1_sinkhorn]="centering=sinkhorn"
  [c2_sinkhorn_k128]="centering=sinkhorn head_out_dim=128"
  [c3_center_k128_cold]="center_momentum=0.9 teacher_temp_end=0.04 head_out_dim=128"
  [c4_sinkhorn_b8]="centering=sinkhorn batch_size=8 lr=2e-4"
)
elif [ "${SWEEP:-2}" = 2 ]; then
R=augment.region_size=48
declare -A RUNS=(
  [s1_region_sephead]="$R ibot_separate_head=true"
  [s2_region_ls1]="$R $MO_LS1"
  [s3_region_ls1_sephead]="$R $MO_LS1 ibot_separate_head=true"
  [s4_region_ls1_sephead_sk]="$R $MO_LS1 ibot_separate_head=true centering=sinkhorn"
  [s5_region_sephead_nodino]="$R ibot_separate_head=true dino_weight=0"
  [s6_region_ls1_sephead_lr3e-5]="$R $MO_LS1 ibot_separate_head=true lr=3e-5"
)
else
# (SWEEP=3: the ViT now maps its [0,1] input to [-1,1]; on CPU that kept the patch targets diverse for 250 steps)
R=augment.region_size=48
declare -A RUNS=(
  [t1_centred]=""
  [t2_centred_region_sephead]="$R ibot_separate_head=true"
  [t3_centred_region_sephead_sk]="$R ibot_separate_head=true centering=sinkhorn"
  [t4_centred_region_sephead_ls1]="$R ibot_separate_head=true $MO_LS1"
  [t5_centred_region_sephead_dino05]="$R ibot_separate_head=true dino_weight=0.5"
)
fi
T0=$(date +%s)
for name in "${!RUNS[@]}"; do
  sets=()
  for kv in device=$DEVICE steps=$SWEEP_STEPS num_workers=$WORKERS threads=1 ckpt_every=500 ${RUNS[$name]}; do
    sets+=(--set "$kv")
  done
  $PY -m dinoreg_core.cli pretrain --config demo --data "$WORK/cohort" --out "$WORK/sweep/$name" --no-progress \
    "${sets[@]}" > "$WORK/sweep/$name.out" 2>&1 &
done
wait
echo "sweep ($SWEEP_STEPS steps x ${#RUNS[@]} runs side by side) took $(( $(date +%s) - T0 )) s" | tee -a "$OUT/session.log"
for name in "${!RUNS[@]}"; do
  tail -2 "$WORK/sweep/$name.out" | sed "s/^/$name: /" | tee -a "$OUT/session.log"
  cp "$WORK/sweep/$name.out" "$WORK/sweep/$name/" 2>/dev/null
done
# linear probe of each run's exported features on held-out synthetic subjects (seed 2026)
if [ "${PROBE:-1}" = 1 ]; then
  T0=$(date +%s)
  $PY -c "from dinoreg_core.data.phantom import PhantomConfig, generate_cohort as g; g('$WORK/probe_cohort', PhantomConfig(n_subjects=5, seed=2026, mr_fraction=1.0, n_val_subjects=0), progress=False)"
  first=1
  for name in "${!RUNS[@]}"; do
    w="$WORK/sweep/$name/teacher_backbone.safetensors"
    [ -f "$w" ] || continue
    methods="random mind intensity"; [ $first = 1 ] || methods=none; first=0
    $PY bench/probe_dino3d.py --device "$DEVICE" --cohort "$WORK/probe_cohort" --weights "$name=$w" --methods $methods \
      --max-train ${PROBE_TRAIN:-10000} --threads 2 --out "$WORK/sweep/probe_$name.csv" > "$WORK/sweep/probe_$name.out" 2>&1 &
  done
  wait
  cat "$WORK"/sweep/probe_*.out | grep "balanced" | tee -a "$OUT/session.log"
  echo "probe took $(( $(date +%s) - T0 )) s" | tee -a "$OUT/session.log"
fi
# logs + configs of all runs in one file, the exported teacher weights in another (checkpoints stay behind)
tar czf "$OUT/sweep_logs.tgz" -C "$WORK/sweep" --exclude checkpoint.pt --exclude '*.safetensors' .
tar czf "$OUT/sweep_weights.tgz" -C "$WORK/sweep" --exclude checkpoint.pt --exclude '*.csv' --exclude '*.out' .
ls -la "$OUT"


# ======================================================================================================================
# PRETRAINING SECTION (issue 14; appended, independent of the sections above): with PRETRAIN=1, after them, the
# streamed demo recipe and the authors' recipe on this GPU with selection by registration (bench/gpu_pretrain.sh;
# that script also runs alone: OUT=/tmp/out bash bench/gpu_pretrain.sh).
if [ "${PRETRAIN:-0}" = 1 ]; then
  OUT="$OUT" WORK="$WORK" DEVICE="$DEVICE" PY="$PY" bash bench/gpu_pretrain.sh
fi
