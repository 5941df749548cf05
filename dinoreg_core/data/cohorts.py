"""Cohorts by role: the seeds of the pretraining stream and of the tuning, validation and evaluation cohorts.

Placeholder filled in below (role seeds first, so the pretraining stream can use its seed).
"""

ROLE_SEEDS = {"pretrain": 14_001, "tuning": 14_002, "validation": 14_003, "evaluation": 14_004}
