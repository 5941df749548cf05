# One-command entry points (see README). Works on a fresh machine with Python >= 3.10 and pip.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup peers-env demo test wheel-check bench reproduce demo-weights clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned to the CPU build first; a bare `torch` requirement would pull a multi-GB CUDA build.
# [notebooks]: jupyterlab, papermill, ipykernel, ipywidgets, matplotlib (the notebook suite and `dinoreg reproduce`;
# papermill runs the notebooks on the kernel "python3", which jupyter_client starts with this venv's Python).
setup: $(BIN)/python
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev,notebooks]"

# ANTs (antspyx) in its own environment: it would downgrade numpy/scipy in the main one. Optional: the ANTs tests
# skip with a reason when it is missing, so a failed install does not fail the tests.
peers-env:
	test -x .venv-peers/bin/python || $(PY) -m venv .venv-peers
	.venv-peers/bin/python -c "import ants" 2>/dev/null || .venv-peers/bin/pip install -q "antspyx==0.6.3"

demo: setup
	$(BIN)/dinoreg demo --out results/demo

test: setup
	-$(MAKE) peers-env
	$(BIN)/python -m pytest -q

# The installed wheel does the whole job: build it, install it into a fresh venv in a temporary folder (dependencies
# linked from $(VENV); WHEEL_CHECK_FULL=1 installs them from the index too) and run dinoreg demo, dinoreg notebooks
# and dinoreg reproduce --help from another temporary folder (.ci/wheel_check.sh).
wheel-check: setup
	DEPS_PY=$(BIN)/python bash .ci/wheel_check.sh

# The notebook suite 01-04 on the synthetic cohort (about 15-20 min on 2 CPU cores); resumable.
reproduce: setup
	$(BIN)/dinoreg reproduce --profile demo

# Retrain the shipped demo weights (dinoreg_core/weights/dino3d_demo.*), in two stages, both resumable (rerun the same
# command after an interruption):
#  1. the 16-subject synthetic CT+MR cohort of seed 1000 (never used for evaluation), then `dinoreg pretrain --config
#     demo` (700 steps; 16 CPU minutes measured on one thread): results/pretrain/demo_run3/;
#  2. fine-tuning of stage 1 on the streamed two-appearance phantoms (`--config stream`, pretrain role seed 14001) at
#     lr 2e-4 for STREAM_STEPS steps, scored every 100 steps by registering the validation cohort (role seed 14003,
#     4 mm), the best step exported as best_backbone.*: results/pretrain/p14/ (run v4).
STREAM_STEPS ?= 1200
demo-weights: setup
	# a CT and a co-registered MR of each subject (no breathing or pose change between them): the demo config pairs them
	$(BIN)/dinoreg data generate-phantoms --out runs/demo_pretrain/paired_cohort --n-subjects 16 --seed 1000 \
		--set mr_fraction=1.0 --set "mr_breath_change_mm=[0,0]" --set mr_pose_mm=0 --set mr_pose_deg=0
	OMP_NUM_THREADS=1 $(BIN)/dinoreg pretrain --config demo --data runs/demo_pretrain/paired_cohort --out runs/demo_pretrain/run --resume
	$(BIN)/dinoreg data cohort --role validation --out runs/demo_pretrain/validation --n-subjects 4 --spacing 4 --shape 96 78 84
	OMP_NUM_THREADS=1 $(BIN)/dinoreg pretrain --config stream --data stream --out runs/demo_pretrain/stream --resume \
		--set init_backbone=runs/demo_pretrain/run/teacher_backbone.safetensors --set steps=$(STREAM_STEPS) \
		--set lr=0.0002 --set warmup_steps=50 --set stream.pool_size=16 --set stream.new_every=16 \
		--set val.every=100 --set val.data=runs/demo_pretrain/validation/SynthValidation_dataset.json --set val.pairs_per_task=1
	@echo "weights: runs/demo_pretrain/stream/best_backbone.safetensors (+ .json), the best validation step; copy them to dinoreg_core/weights/dino3d_demo.*"

bench: setup
	$(BIN)/python bench/convex_adam_vs_official.py

clean:
	rm -rf $(VENV) build *.egg-info
