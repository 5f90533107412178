"""The one home of every name the record format spells: statistics, files of a run folder,
arrays of an interval's array file. Every other module takes these names from here."""

from __future__ import annotations

SCHEMA_VERSION = 1

# ---------------------------------------------------------------------------- statistic names

# Per-expert load statistics (stats.EXPERT_STATS gives each its function, in this order).
EXPERT_STATS = ("max_over_mean", "min_over_mean", "gini", "cv", "entropy", "dead_experts")
# Per-step statistics summarized over the interval as <name>_step_mean / <name>_step_worst.
STEP_SUMMARIZED = ("max_over_mean", "gini", "cv", "entropy", "dead_experts", "rank_max_over_mean")
STEP_SUMMARIES = ("step_mean", "step_worst")
# Token volume by where it goes: the EP rank itself, another GPU of its node, another node.
LOCALITY_STATS = ("local_tokens", "intra_node_tokens", "inter_node_tokens")
# Statistics computed from the rank-to-rank matrix (undefined for a run that has none).
MATRIX_STATS = ("receiver_skew", "sender_skew", *LOCALITY_STATS, "inter_node_fraction")
# Dispatcher phases the timer measures (megatron/timing.py); each is reported as <phase>_ms.
PHASES = ("dispatch_fwd", "combine_fwd", "dispatch_bwd", "combine_bwd")


def step_summary_name(stat: str, summary: str) -> str:
    return f"{stat}_{summary}"


def timing_stat(phase: str) -> str:
    return f"{phase}_ms"


TIMING_STATS = tuple(timing_stat(p) for p in PHASES)

# Column order of the layer table: identification first, then the statistics the
# probe reports (any subset), then unknown statistics sorted by name.
ID_COLUMNS = ("step", "steps", "time", "layer")
KNOWN_STATS: tuple[str, ...] = (
    "tokens",
    *EXPERT_STATS,
    "rank_max_over_mean",
    "receiver_skew",
    "sender_skew",
    *LOCALITY_STATS,
    "inter_node_fraction",
    "dropped_tokens",
    "dropped_fraction",
    *(step_summary_name(name, kind) for name in STEP_SUMMARIZED for kind in STEP_SUMMARIES),
    *TIMING_STATS,
)

# Per-layer columns of the end-of-run summary table (grouping.summary_rows: medians over a run).
SUMMARY_STATS = ("tokens", "max_over_mean", step_summary_name("max_over_mean", "step_worst"), "gini", "cv",
                 "entropy", "dead_experts", "rank_max_over_mean", "receiver_skew", "inter_node_fraction",
                 "dropped_fraction", *TIMING_STATS)
# Per-layer columns `moe-probe compare` reports (offline/run_row.py: medians after the warm-up).
COMPARE_STATS = ("max_over_mean", step_summary_name("max_over_mean", "step_worst"), "gini", "rank_max_over_mean",
                 "receiver_skew", "inter_node_fraction", *TIMING_STATS)

# ---------------------------------------------------------------------------- run folder

META_FILE = "meta.json"
INTERVALS_FILE = "intervals.jsonl"
LAYERS_FILE = "layers.parquet"
ITERATIONS_DIR = "iterations"  # one .npz of integer arrays per interval (per-iteration and per-domain counts)
LOCK_FILE = ".moe-probe.lock"  # the one writer of the folder (record/lock.py)
# Arrays of an interval's .npz file:
#   iterations                [S]            the iteration number of each per-iteration row
#   layers                    [L]            global layer numbers (as `layers` of the record)
#   tokens_per_expert         [S, L, E]      each iteration's own counts (sum over S = the interval's)
#   rank_matrix               [S, L, EP, EP] each iteration's rank-to-rank matrix (--moe-probe-iterations matrix)
#   domain_tokens_per_expert  [D, L, E]      the interval's counts by domain (sum over D = the interval's)
ARRAY_NAMES = ("iterations", "layers", "tokens_per_expert", "rank_matrix", "domain_tokens_per_expert")
STORE_FORMAT = "megatron_moe_probe.local/1"

# What every run writes into its folder; a command adds its own (train.jsonl, imbalance.png, ...).
RUN_FILES = (META_FILE, INTERVALS_FILE, LAYERS_FILE, ITERATIONS_DIR)


def arrays_file_name(step: int) -> str:
    """The run-folder-relative name of the array file of the interval closing at `step`."""
    return f"{ITERATIONS_DIR}/step_{int(step):09d}.npz"
