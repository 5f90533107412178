"""Megatron-Core 0.19's own routing dumps read as probe runs (`moe-probe import`, and
`analyze` / `compare` given a dump folder directly).

Two recorders, two formats (both written by Megatron, never by us):

- RouterTracer (`--moe-routing-trace-path DIR`, megatron/core/transformer/moe/router_trace.py):
  `DIR/router_trace_rank{R}.jsonl`, one record per router call (micro-batch x layer x rank)
  `{"step", "stage", "block", "layer", "rank", "num_tokens", "topk", "top_indices": [[e..]..]}`.
  The per-token top-k indices give exact per-step expert counts and, because each rank's
  tokens are known, the rank-to-rank matrix at any EP degree (`ep=`), not only the trained one.
- Tokens-per-expert logger (`--save-tokens-per-expert-interval N`,
  megatron/training/activation_logging.py `save_tpe`): `{save}/tokens_per_expert/rank{R}.jsonl`,
  one record per sampled iteration x layer `{"iter", "block", "layer", "tpe": [[local-expert
  counts] per micro-batch]}`. Counts of the tokens each rank's experts received; it does not
  say where they came from, so imported runs have no rank matrix (analyze says so).

Numbering, as the probe's: iterations are 1-based (RouterTracer stamps the 0-based iteration
it is called with, `save_tpe` already adds 1), layers are global and 1-based (Megatron names
the module `decoder.layers.N`, N 0-based), MTP layers come after the highest decoder layer.
Both recorders take N from the module name, which is stage-local under pipeline
parallelism: import one pipeline stage's ranks at a time (`ranks=`).

What RouterTracer does that has to be undone (docs/megatron.md, "Megatron's own dumps"):
- evaluation forwards between two training steps are buffered and stamped with the next
  step, ahead of that step's records: per (layer, rank) the usual record count is the mode
  over steps, and a step with more keeps only its last records (the extra ones are dropped,
  and counted in meta `imported.dropped_records`);
- activation recomputation calls the router again on the same tokens: records of one
  (step, layer, rank) with identical indices are duplicates and dropped (also counted);
- a router call whose routing map lost tokens (capacity factor) writes no record: such
  steps are reported as missing records, not filled in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from megatron_moe_probe.errors import UsageError

log = logging.getLogger("megatron_moe_probe")

ROUTER_TRACE = "router_trace"
TOKENS_PER_EXPERT = "tokens_per_expert"
_TRACE_FILE = re.compile(r"^router_trace_rank(\d+)\.jsonl$")
_TPE_FILE = re.compile(r"^rank(\d+)\.jsonl$")
# Statistics of a report that come from the rank matrix: undefined without one.
_MATRIX_STATS = ("receiver_skew", "sender_skew", "local_tokens", "intra_node_tokens", "inter_node_tokens",
                 "inter_node_fraction")


class DumpError(UsageError, ValueError):
    """A dump that cannot be read as it is: truncated, mixed, or not one of the formats."""


def _rank_files(folder: Path, pattern: re.Pattern) -> dict[int, Path]:
    out = {}
    for p in folder.iterdir() if folder.is_dir() else []:
        m = pattern.match(p.name)
        if m:
            out[int(m.group(1))] = p
    return dict(sorted(out.items()))


def detect(path: str | Path) -> tuple[str, Path] | None:
    """(format, folder holding the rank files) if `path` is one of Megatron's dumps, else None.
    A folder holding both kinds is refused: they would be two runs' worth of counts."""
    path = Path(path)
    if not path.is_dir() or (path / "intervals.jsonl").exists():
        return None
    trace = _rank_files(path, _TRACE_FILE)
    tpe_dir = path / "tokens_per_expert" if (path / "tokens_per_expert").is_dir() else path
    tpe = _rank_files(tpe_dir, _TPE_FILE)
    if trace and tpe:
        raise DumpError(f"{path}: mixed dump: both RouterTracer files (router_trace_rank*.jsonl) and "
                        f"tokens-per-expert files ({tpe_dir.name}/rank*.jsonl); import one folder at a time")
    if trace:
        return ROUTER_TRACE, path
    if tpe:
        return TOKENS_PER_EXPERT, tpe_dir
    return None


@dataclass
class ImportOptions:
    ep: int | None = None  # EP degree of the rank matrix (trace) / the run (tpe); default: see below
    num_experts: int | None = None  # default: router_state_rank*.pt, else the largest index + 1 (trace)
    interval: int | None = None  # steps per report: trace 10, tpe 1 (each record is one sampled iteration)
    topk: int | None = None  # tpe only (the trace records it)
    hidden_size: int | None = None  # for the cost model, when the dump does not say
    gpus_per_node: int = 8
    ranks: list[int] | None = None  # import only these ranks (one pipeline stage)
    drop_incomplete: bool = False  # drop a cut-short last line and steps some rank lacks, instead of failing


def _lines(path: Path, drop_incomplete: bool) -> Iterator[tuple[int, str]]:
    """(line number, text) of every non-empty line; a last line without its newline is a
    record cut short by a killed process."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith("\n"):
                if drop_incomplete:
                    log.warning("%s: dropping line %d, cut short (the run stopped while writing it)", path, number)
                    return
                raise DumpError(f"{path}: line {number} is cut short (the run stopped while writing it); "
                                "pass --drop-incomplete to drop it and the steps other ranks have but this one lacks")
            if line.strip():
                yield number, line


def _cut_short(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(0, 2)
        if f.tell() == 0:
            return False
        f.seek(-1, 2)
        return f.read(1) != b"\n"


def _layer_key(rec: dict, where: str) -> tuple[str, int, int]:
    block = rec.get("block", "decoder")
    if block == "mtp":
        return "mtp", int(rec.get("mtp_idx", 0)), int(rec["layer"])
    if block != "decoder":
        raise DumpError(f"{where}: unknown block {block!r}")
    return "decoder", 0, int(rec["layer"])


def _layer_numbers(keys) -> dict[tuple, int]:
    """Global 1-based layer number per (block, mtp_idx, layer): decoder N -> N+1, MTP after."""
    decoder = [k for k in keys if k[0] == "decoder"]
    top = max((k[2] for k in decoder), default=-1) + 1
    return {k: (k[2] + 1 if k[0] == "decoder" else top + k[1] + k[2] + 1) for k in keys}


@dataclass
class _Counts:
    """Counts gathered from a dump, before they become interval reports."""

    step_counts: dict[tuple[int, tuple], Any] = field(default_factory=dict)  # (iteration, layer) -> [E]
    source_counts: dict[tuple[int, tuple], Any] = field(default_factory=dict)  # (iteration, layer) -> [EP, E]
    tokens_per_call: Counter = field(default_factory=Counter)
    topk: set = field(default_factory=set)
    dropped: Counter = field(default_factory=Counter)  # reason -> records
    missing: list = field(default_factory=list)  # (iteration, layer, rank) with fewer records than usual
    micro_batches: set = field(default_factory=set)


# ---------------------------------------------------------------------------- RouterTracer


def _trace_prefix(line: str, where: str) -> dict:
    """The small fields of a RouterTracer record without parsing its indices (they are
    written last: `_flush_records_to_disk` adds `top_indices` after the others)."""
    cut = line.find('"top_indices"')
    try:
        head = json.loads(line[:cut].rstrip().rstrip(",") + "}") if cut > 0 else json.loads(line)
    except ValueError as exc:
        raise DumpError(f"{where}: not a RouterTracer record ({exc})") from None
    missing = [k for k in ("step", "layer", "rank", "num_tokens", "topk") if k not in head]
    if missing or cut < 0:
        raise DumpError(f"{where}: not a RouterTracer record (no {', '.join(missing or ['top_indices'])})")
    return head


def _trace_num_experts(folder: Path, ranks) -> tuple[int, str] | None:
    """Experts from the router weights RouterTracer saves with --moe-routing-trace-dump-weights."""
    for rank in ranks:
        path = folder / f"router_state_rank{rank}.pt"
        if path.exists():
            import torch

            state = torch.load(path, map_location="cpu", weights_only=True)
            for value in state.values():
                if value.get("weight") is not None:
                    return int(value["weight"].shape[0]), path.name
    return None


def _read_trace(folder: Path, files: dict[int, Path], opts: ImportOptions, ep: int, world: int) -> _Counts:
    import torch

    # Pass 1 (small fields only): records per (step, layer, rank), to find evaluation
    # forwards folded into a step and missing ones.
    per_step: dict[int, Counter] = {}
    for rank, path in files.items():
        counts: Counter = Counter()
        for number, line in _lines(path, opts.drop_incomplete):
            head = _trace_prefix(line, f"{path}:{number}")
            if int(head["rank"]) != rank:
                raise DumpError(f"{path}:{number}: mixed dump: a record of rank {head['rank']} in rank {rank}'s file")
            counts[(int(head["step"]), _layer_key(head, f"{path}:{number}"))] += 1
        per_step[rank] = counts
    steps_by_rank = {r: {s for s, _ in c} for r, c in per_step.items()}
    for rank, path in files.items():
        if steps_by_rank[rank] and _cut_short(path):  # (only reached with drop_incomplete)
            steps_by_rank[rank].discard(max(steps_by_rank[rank]))  # the step being written is incomplete
    all_steps = set().union(*steps_by_rank.values())
    common = set.intersection(*steps_by_rank.values())
    if common != all_steps:
        short = {r: len(all_steps - s) for r, s in steps_by_rank.items() if all_steps - s}
        if not opts.drop_incomplete:
            raise DumpError(f"{folder}: truncated or mixed dump: rank(s) {', '.join(map(str, short))} lack "
                            f"{max(short.values())} of the {len(all_steps)} steps the others recorded; "
                            "pass --drop-incomplete to keep only the steps every rank has")
        log.warning("%s: keeping the %d steps every rank recorded, dropping %d", folder, len(common),
                    len(all_steps - common))
    # The usual record count per (layer, rank): micro-batches (x2 under recomputation).
    usual = {(r, key): Counter(n for (s, k), n in c.items() if k == key and s in common).most_common(1)[0][0]
             for r, c in per_step.items() for key in {k for _, k in c}}

    out = _Counts()
    chunks = max(1, ep // world)  # a source EP rank per contiguous chunk of a rank's tokens when EP > ranks
    for rank, path in files.items():
        # A step's records are contiguous in the file (advance_step writes them at once), its
        # layers interleaved by micro-batch: gather one step, then settle each layer.
        current: dict = defaultdict(list)
        current_step = None

        def close_step():
            for key, group in current.items():
                keep, n = usual[(rank, key)], len(group)
                seen: set = set()
                # Extra records come first (evaluation ran before this step's training forward).
                for idx in group[max(0, n - keep):]:
                    digest = hashlib.blake2b(idx.numpy().tobytes(), digest_size=16).digest()
                    if digest in seen:
                        out.dropped["recomputation (duplicate indices)"] += 1
                        continue
                    seen.add(digest)
                    _add_trace_record(out, current_step + 1, key, idx, rank, ep, chunks, opts)
                if n > keep:
                    out.dropped["evaluation folded into the next step"] += n - keep
                elif n < keep:
                    out.missing.append((current_step + 1, key, rank))
            current.clear()

        for number, line in _lines(path, opts.drop_incomplete):
            rec = json.loads(line)
            where = f"{path}:{number}"
            step, key = int(rec["step"]), _layer_key(rec, where)
            if step not in common:
                continue
            if step != current_step:
                if current_step is not None and step < current_step:
                    raise DumpError(f"{where}: mixed dump: step {step} after step {current_step}")
                close_step()
                current_step = step
            idx = torch.tensor(rec["top_indices"], dtype=torch.int64)
            if idx.dim() != 2 or idx.shape[0] != rec["num_tokens"] or idx.shape[1] != rec["topk"]:
                raise DumpError(f"{where}: top_indices has shape {tuple(idx.shape)}, the record says "
                                f"{rec['num_tokens']} tokens x top-{rec['topk']}")
            out.topk.add(int(rec["topk"]))
            out.tokens_per_call[int(rec["num_tokens"])] += 1
            current[key].append(idx)
        if current_step is not None:
            close_step()
    if len(out.topk) > 1:
        raise DumpError(f"{folder}: mixed dump: records with top-k {sorted(out.topk)}")
    return out


def _add_trace_record(out: _Counts, iteration: int, key, idx, rank: int, ep: int, chunks: int, opts) -> None:
    import torch

    n, k = idx.shape
    if n and int(idx.min()) < 0:
        raise DumpError(f"rank {rank} iteration {iteration}: negative expert index")
    width = max(opts.num_experts or 0, int(idx.max()) + 1 if n else 0)
    if opts.num_experts and width > opts.num_experts:
        raise DumpError(f"rank {rank} iteration {iteration}: expert index {width - 1} >= --num-experts "
                        f"{opts.num_experts}")
    # Source EP rank: rank % EP when the dump has at least EP ranks (Megatron's rank order with
    # TP = CP = 1: EP varies fastest), else contiguous chunks of each rank's tokens.
    if chunks > 1:
        src = (rank * chunks + torch.arange(n) * chunks // max(n, 1)).unsqueeze(1).expand(n, k)
    else:
        src = torch.full((n, k), rank % ep, dtype=torch.int64)
    flat = torch.bincount((src * width + idx).reshape(-1), minlength=ep * width).view(ep, width)
    _accumulate(out.source_counts, (iteration, key), flat)
    _accumulate(out.step_counts, (iteration, key), flat.sum(0))


def _accumulate(table: dict, key, value) -> None:
    import torch

    old = table.get(key)
    if old is None:
        table[key] = value.clone()
        return
    width = max(old.shape[-1], value.shape[-1])
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[-1]))  # noqa: E731
    table[key] = pad(old) + pad(value)


# ---------------------------------------------------------------------------- tokens per expert


def _read_tpe(folder: Path, files: dict[int, Path], opts: ImportOptions, ep: int) -> _Counts:
    import torch

    out = _Counts()
    local: set = set()
    micro: set = set()
    per_rank_iters: dict[int, set] = {}
    for rank, path in files.items():
        last = None
        iters = per_rank_iters.setdefault(rank, set())
        for number, line in _lines(path, opts.drop_incomplete):
            where = f"{path}:{number}"
            try:
                rec = json.loads(line)
                it, tpe = int(rec["iter"]), rec["tpe"]
            except (ValueError, KeyError, TypeError) as exc:
                raise DumpError(f"{where}: not a tokens-per-expert record ({exc})") from None
            if last is not None and it < last:
                raise DumpError(f"{where}: mixed dump: iteration {it} after {last} (two runs appended to "
                                "one file? save_tpe appends); keep one run's lines")
            last = it
            key = _layer_key(rec, where)
            if not tpe or any(len(mb) != len(tpe[0]) for mb in tpe):
                raise DumpError(f"{where}: micro-batches with different numbers of local experts")
            local.add(len(tpe[0]))
            micro.add(len(tpe))
            if (it, key) in iters:
                raise DumpError(f"{where}: mixed dump: a second record for iteration {it} layer {rec['layer']}")
            iters.add((it, key))
            counts = torch.tensor(tpe, dtype=torch.int64).sum(0)  # over micro-batches
            e_local = counts.shape[0]
            ep_rank = rank % ep
            row = torch.zeros(ep * e_local, dtype=torch.int64)
            row[ep_rank * e_local:(ep_rank + 1) * e_local] = counts
            _accumulate(out.step_counts, (it, key), row)
    if len(local) > 1:
        raise DumpError(f"{folder}: mixed dump: records with {sorted(local)} local experts")
    everything = set().union(*per_rank_iters.values())
    lacking = {r: len(everything - s) for r, s in per_rank_iters.items() if everything - s}
    if lacking:
        if not opts.drop_incomplete:
            raise DumpError(f"{folder}: truncated or mixed dump: rank(s) {', '.join(map(str, lacking))} lack "
                            f"records the others have; pass --drop-incomplete to keep only what every rank has")
        common = set.intersection(*per_rank_iters.values())
        out.dropped["not recorded by every rank"] += len(everything - common)
        out.step_counts = {k: v for k, v in out.step_counts.items() if k in common}
    out.micro_batches = micro
    return out


# ---------------------------------------------------------------------------- reports


def _reports(counts: _Counts, num_experts: int, ep: int, interval: int, matrix: bool, gpus_per_node: int,
             report_meta: dict) -> list:
    import torch

    from megatron_moe_probe import stats
    from megatron_moe_probe.accumulator import Snapshot
    from megatron_moe_probe.summarize import build_report

    keys = sorted({k for _, k in counts.step_counts})
    numbers = _layer_numbers(keys)
    iterations = sorted({it for it, _ in counts.step_counts})
    fit = lambda t: torch.nn.functional.pad(t, (0, num_experts - t.shape[-1]))  # noqa: E731
    nodes = stats.node_of_ranks(list(range(ep)), gpus_per_node)
    reports = []
    for start in range(0, len(iterations), interval):
        its = iterations[start:start + interval]
        per_step = torch.stack([torch.stack([fit(counts.step_counts.get((it, k), torch.zeros(0, dtype=torch.int64)))
                                             for k in keys]) for it in its])  # [S, L, E]
        if matrix:
            source = torch.stack([sum(fit(counts.source_counts[(it, k)]) for it in its if (it, k) in counts.source_counts)
                                  for k in keys])  # [L, EP, E]
            locality = stats.locality_split(stats.rank_matrix_from_source_counts(source, ep), nodes)
        else:
            source = torch.zeros(len(keys), ep, num_experts, dtype=torch.int64)
            locality = torch.zeros(len(keys), 3, dtype=torch.int64)
        snap = Snapshot(step=its[-1], steps=len(its), layers=[numbers[k] for k in keys], num_experts=num_experts,
                        ep_size=ep, tokens_per_expert=per_step.sum(0), step_tokens_per_expert=per_step,
                        source_expert_counts=source, locality=locality, time=0.0,
                        meta={**report_meta, "steps_in_history": len(its), "history_folded": False,
                              "iterations": its if len(its) < its[-1] - its[0] + 1 else None})
        report = build_report(snap)
        if not matrix:
            report.rank_matrix = []
            for row in report.per_layer:
                for name in _MATRIX_STATS:
                    row[name] = math.nan
        reports.append(report)
    return reports


def load_dump(path: str | Path, opts: ImportOptions | None = None) -> tuple[dict, list]:
    """(meta, [IntervalReport]) of a Megatron dump, as `record.load_run` gives for a run
    folder. Raises DumpError (exit 2 in the CLI) for truncated, mixed or unreadable dumps."""
    opts = opts or ImportOptions()
    found = detect(path)
    if found is None:
        raise DumpError(f"{path}: not a Megatron routing dump (no router_trace_rank*.jsonl, "
                        "tokens_per_expert/rank*.jsonl or rank*.jsonl)")
    kind, folder = found
    files = _rank_files(folder, _TRACE_FILE if kind == ROUTER_TRACE else _TPE_FILE)
    if opts.ranks is not None:
        unknown = sorted(set(opts.ranks) - set(files))
        if unknown:
            raise DumpError(f"{folder}: no file for rank(s) {', '.join(map(str, unknown))} "
                            f"(it has {', '.join(map(str, files))})")
        files = {r: files[r] for r in opts.ranks}
    world = len(files)
    if sorted(files) != list(range(min(files), min(files) + world)) and opts.ranks is None:
        raise DumpError(f"{folder}: truncated dump: rank files {sorted(files)} are not consecutive")
    notes: list[str] = []
    if kind == ROUTER_TRACE:
        ep = opts.ep or world
        if ep > world and ep % world:
            raise DumpError(f"--ep {ep} is neither at most the {world} ranks recorded nor a multiple of them")
        counts = _read_trace(folder, files, opts, ep, world)
        if not counts.step_counts:
            raise DumpError(f"{folder}: the dump holds no records")
        largest = max(v.shape[-1] for v in counts.step_counts.values())
        known = (opts.num_experts, "--num-experts") if opts.num_experts else _trace_num_experts(folder, files)
        if known is None:
            num_experts, source = largest, "the largest expert index recorded + 1 (pass --num-experts if an expert never got a token)"
            notes.append(f"experts: {num_experts} from {source}")
        else:
            num_experts, source = known
            if largest > num_experts:
                raise DumpError(f"{folder}: expert index {largest - 1} but {num_experts} experts ({source})")
        topk = next(iter(counts.topk))
        calls = counts.tokens_per_call.most_common(1)[0][0]
        interval = opts.interval or 10
        matrix = True
    else:
        first = next(_lines(next(iter(files.values())), True), None)
        try:
            local = len(json.loads(first[1])["tpe"][0])
        except (TypeError, ValueError, KeyError, IndexError):
            raise DumpError(f"{folder}: rank {min(files)}'s file is empty or not a tokens-per-expert record") from None
        ep = opts.ep or world
        if world % ep and ep % world:
            raise DumpError(f"--ep {ep} does not fit the {world} ranks recorded")
        counts = _read_tpe(folder, files, opts, ep)
        num_experts, source = local * ep, f"{local} local experts x EP {ep}"
        if opts.num_experts and opts.num_experts != num_experts:
            raise DumpError(f"--num-experts {opts.num_experts} but the dump has {local} local experts x EP {ep}")
        if ep > world:
            notes.append(f"only {world} of the {ep} EP ranks recorded: the others' experts count 0")
        topk, calls, interval, matrix = opts.topk, None, opts.interval or 1, False
        notes.append("no rank matrix: tokens_per_expert records say what each rank's experts received, "
                     "not from which rank")
    if num_experts % ep:
        raise DumpError(f"EP {ep} does not divide {num_experts} experts; pass --ep")
    if ep == 1:
        notes.append("EP 1: pass --ep N for the rank matrix at N ranks")
    reports = _reports(counts, num_experts, ep, interval, matrix, opts.gpus_per_node,
                       {"topk": topk, "gpus_per_node": opts.gpus_per_node} if topk else
                       {"gpus_per_node": opts.gpus_per_node})
    if counts.missing:
        notes.append(f"{len(counts.missing)} (iteration, layer, rank) have fewer records than usual "
                     "(RouterTracer writes none for a router call that dropped tokens); first: "
                     f"iteration {counts.missing[0][0]}, rank {counts.missing[0][2]}")
    for reason, n in counts.dropped.items():
        notes.append(f"dropped {n} record(s): {reason}")
    for note in notes:
        log.warning("%s: %s", path, note)
    args: dict[str, Any] = {"moe_router_topk": topk, "num_experts": num_experts}
    if opts.hidden_size:
        args["hidden_size"] = opts.hidden_size
    meta = {
        "command": [], "dispatcher": None, "args": {k: v for k, v in args.items() if v is not None},
        "probe": {"gpus_per_node": opts.gpus_per_node},
        "imported": {"format": kind, "from": str(Path(path).resolve()), "ranks": sorted(files),
                     "ep": ep, "num_experts_from": source, "rank_matrix": "measured" if matrix else "absent",
                     "tokens_per_call": calls, "dropped_records": dict(counts.dropped),
                     "missing_records": len(counts.missing), "notes": notes},
    }
    return meta, reports


def load_if_dump(path: str | Path) -> tuple[dict, list] | None:
    """load_dump with the defaults when `path` is a Megatron dump, else None (a run folder)."""
    return load_dump(path) if detect(path) is not None else None
