"""`moe-probe import DUMP --out RUN`: Megatron's own routing dump (a RouterTracer folder or a
tokens_per_expert folder) written as a probe run folder, for `analyze`, `compare` and plots.
`analyze` and `compare` also take the dump folder directly, with the defaults below.

The run folder appears whole or not at all: it is built under a temporary name beside --out
and renamed into place once complete (a full disk or a kill leaves no half run behind)."""

from __future__ import annotations

import argparse

from megatron_moe_probe.commands import bounded_int, int_list


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dump", help="--moe-routing-trace-path folder (router_trace_rank*.jsonl), or "
                                "--save folder / its tokens_per_expert/ (rank*.jsonl)")
    p.add_argument("--out", required=True, help="run folder to write (must not exist, or be empty)")
    p.add_argument("--ep", type=bounded_int(), help="EP degree: of the rank matrix to compute (RouterTracer: any "
                                                    "degree; default the number of ranks), or the run's (tokens per expert)")
    p.add_argument("--num-experts", type=bounded_int(high=1 << 20),
                   help="RouterTracer: default from router_state_rank*.pt, else the largest expert index + 1")
    p.add_argument("--interval", type=bounded_int(), help="steps per report (default 10 for RouterTracer, "
                                                          "1 for tokens per expert: each record is one sampled iteration)")
    p.add_argument("--topk", type=bounded_int(high=1 << 20),
                   help="tokens per expert dumps do not record top-k; the cost model needs it")
    p.add_argument("--hidden-size", type=bounded_int(), help="for the cost model")
    p.add_argument("--gpus-per-node", type=bounded_int(), default=8,
                   help="for local / intra- / inter-node traffic (default 8)")
    p.add_argument("--ranks", type=int_list, metavar="R,R",
                   help="only these ranks' files (with pipeline parallelism: one stage at a time)")
    p.add_argument("--drop-incomplete", action="store_true",
                   help="drop a cut-short last line and steps not every rank recorded, instead of failing")


def run(args: argparse.Namespace) -> int:
    from megatron_moe_probe import record
    from megatron_moe_probe.megatron_dumps import ImportOptions, load_dump

    opts = ImportOptions(ep=args.ep, num_experts=args.num_experts, interval=args.interval, topk=args.topk,
                         hidden_size=args.hidden_size, gpus_per_node=args.gpus_per_node, ranks=args.ranks,
                         drop_incomplete=args.drop_incomplete, log_notes=False)
    with record.new_run_folder(args.out) as building:  # refuses a taken --out before the dump is read
        meta, reports = load_dump(args.dump, opts)  # everything is read and checked before anything is written
        record.write_run(building, reports, meta)
    out = args.out
    info = meta["imported"]
    tokens = sum(sum(row) for row in reports[-1].tokens_per_expert) if reports else 0
    print(f"{out}: {len(reports)} reports from a {info['format']} dump of {len(info['ranks'])} rank(s), "
          f"iterations {reports[0].step - reports[0].steps + 1}-{reports[-1].step}, "
          f"{reports[0].num_experts} experts, EP {info['ep']}, layers {', '.join(map(str, reports[0].layers))}; "
          f"last report: {tokens} assignments")
    for note in info["notes"]:
        print(f"  note: {note}")
    print(f"next: moe-probe analyze {out}")
    return 0
