import os
import sys

# Rank functions for spawned processes live in tests/megatron_jobs.py; spawn re-imports them by name.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
