"""`moe-probe build-dataset`: local text files -> a Megatron indexed dataset (megatron/data.py)."""

from __future__ import annotations

import argparse
import sys

from megatron_moe_probe.megatron.data import build


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_DIR",
                   help="text files or folders (read recursively); files ending .jsonl are JSON lines")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX", help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--tokenizer", default="bytes", metavar="bytes|hf:DIR",
                   help="'bytes' (UTF-8 bytes, EOD 256; train with NullTokenizer --vocab-size 257) or a local "
                        "HuggingFace tokenizer folder 'hf:DIR' (needs transformers)")
    p.add_argument("--append-eod", action="store_true", help="end every document with the end-of-document token")
    p.add_argument("--split-lines", action="store_true", help="one document per non-empty line (plain text files)")
    p.add_argument("--json-key", default="text", help="the text field of .jsonl inputs (default: text)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    result = build(args.input, args.output_prefix, tokenizer=args.tokenizer, append_eod=args.append_eod,
                   split_lines=args.split_lines, json_key=args.json_key,
                   progress=not args.no_progress and sys.stderr.isatty())
    print(f"wrote {result.prefix}.bin / .idx: {result.documents} documents, {result.tokens} tokens "
          f"from {result.files} file(s), {result.dtype}, tokenizer {result.tokenizer.name} "
          f"(vocab {result.tokenizer.vocab_size}, EOD {result.tokenizer.eod})")
    print("train on it with: --data-path " + result.prefix + " " + " ".join(result.tokenizer.train_args))
    return 0
