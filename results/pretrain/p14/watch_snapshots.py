"""Score each new snapshot of a running pretraining run on the validation cohort (post-hoc selection)."""
import sys, time
from pathlib import Path
from dinoreg_core.ssl.select import ValConfig, evaluate_snapshots
run = Path(sys.argv[1]); data = sys.argv[2]
cfg = ValConfig(data=data, pairs_per_task=1)
while True:
    if (run / "snapshots").is_dir():
        evaluate_snapshots(run, cfg)
    if (run / "teacher_backbone.safetensors").exists() or (run / "STOP").exists():
        evaluate_snapshots(run, cfg)
        break
    time.sleep(60)
