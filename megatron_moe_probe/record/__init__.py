"""The record: what one log interval of the probe says, and the run folder that holds it.

One module per concept (this package re-exports them all, so `record.X` names the format):

    names       every statistic, file and array name (the one home of each)
    report      IntervalReport, the plain-data record of one interval
    schema      IntervalRecord, the typed model a record must pass to be read
    run_meta    RunMeta, the typed run description meta.json holds, and RunSettings
    problems    one line from a typed model's refusal; CorruptRunError
    encoding    plain JSON from anything a run records
    atomic      files written whole or not at all
    lock        one writer per run folder, between processes
    folder      run-folder policy: one run per folder, resume, whole-folder builds
    arrays      the per-interval .npz files
    linelog     the demo's train.jsonl
    writing     meta.json, intervals.jsonl, write_run
    reading     load_meta, iter_reports, the supersede rule, load_run
    table       layers.parquet

The on-disk form of a run folder:

    meta.json         RunMeta, written atomically (temp file + fsync + os.replace)
    intervals.jsonl   one IntervalReport.to_dict() per line, strict JSON (NaN/inf -> null)
    layers.parquet    one row per (step, layer); derived from intervals.jsonl when pyarrow is importable
    iterations/       one .npz of integer arrays per interval
    .moe-probe.lock   while a writer runs: its pid and host

Durability: every record is written with a single write() and flushed to the OS at once,
so a killed process loses at most the record being written, which the reader skips.
A writer that appends to a file whose last line was cut short truncates that fragment
first (`open_for_append`). The live writer (writers/local.py) adds only fsync-at-close.

This package imports no torch: comparison and analysis tools read runs with it.
"""

from megatron_moe_probe.record.arrays import compact_int_array, load_arrays, write_arrays
from megatron_moe_probe.record.atomic import atomic_write_text, replace_atomically, temp_beside
from megatron_moe_probe.record.encoding import to_json_safe
from megatron_moe_probe.record.folder import (claim_run_folder, fresh_run_folder, holds_run, new_run_folder,
                                              training_run_folder)
from megatron_moe_probe.record.linelog import LineLog
from megatron_moe_probe.record.lock import RunFolderBusy, acquire as lock_run_folder, release_lock
from megatron_moe_probe.record.names import (ARRAY_NAMES, COMPARE_STATS, EXPERT_STATS, ID_COLUMNS, INTERVALS_FILE,
                                             ITERATIONS_DIR, KNOWN_STATS, LAYERS_FILE, LOCALITY_STATS, LOCK_FILE,
                                             MATRIX_STATS, META_FILE, PHASES, RUN_FILES, SCHEMA_VERSION,
                                             STEP_SUMMARIES, STEP_SUMMARIZED, STORE_FORMAT, SUMMARY_STATS,
                                             TIMING_STATS, arrays_file_name, step_summary_name, timing_stat)
from megatron_moe_probe.record.problems import CorruptRunError
from megatron_moe_probe.record.reading import iter_reports, load_meta, load_run, supersede_restarts
from megatron_moe_probe.record.report import IntervalReport
from megatron_moe_probe.record.run_meta import RunMeta, RunSettings, settings_of
from megatron_moe_probe.record.schema import IntervalRecord, decode_report
from megatron_moe_probe.record.table import layer_rows, load_layer_table, stat_columns, write_layer_table
from megatron_moe_probe.record.writing import append_report, encode_report, open_for_append, write_meta, write_run

__all__ = [name for name in dir() if not name.startswith("_")]
