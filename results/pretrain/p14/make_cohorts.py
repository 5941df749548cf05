import time
from dinoreg_core.data.cohorts import generate_role_cohort
t=time.time()
print(generate_role_cohort("runs/cohorts/validation", "validation", 4, spacing_mm=4.0, shape=(96, 78, 84), workers=1, progress=False), time.time()-t, flush=True)
print(generate_role_cohort("runs/cohorts/evaluation", "evaluation", 10, workers=1, progress=False), time.time()-t, flush=True)
