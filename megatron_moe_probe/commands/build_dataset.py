"""`moe-probe build-dataset`: local text files -> a Megatron indexed dataset (megatron/data.py)."""

from __future__ import annotations

import argparse
import sys

import contextlib
import os
from pathlib import Path

from megatron_moe_probe.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", metavar="FILE_OR_DIR",
                   help="text files or folders (read recursively); files ending .jsonl are JSON lines")
    p.add_argument("--output-prefix", metavar="PREFIX", help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--domains", metavar="DIR",
                   help="instead of --input: build four domain datasets from this machine, no download "
                        "(DIR/code: Python stdlib source; DIR/prose: package documentation; DIR/math: "
                        "generated problems; DIR/data: JSON/YAML/CSV), each its own dataset, and print the blend")
    p.add_argument("--max-mb", type=float, default=16.0, help="with --domains: MB of text per domain (default 16)")
    p.add_argument("--seed", type=int, default=0, help="with --domains: seed of the generated math and data")
    p.add_argument("--tokenizer", default="bytes", metavar="bytes|hf:DIR",
                   help="'bytes' (UTF-8 bytes, EOD 256; train with NullTokenizer --vocab-size 257) or a local "
                        "HuggingFace tokenizer folder 'hf:DIR' (needs transformers)")
    p.add_argument("--append-eod", action="store_true", help="end every document with the end-of-document token")
    p.add_argument("--split-lines", action="store_true", help="one document per non-empty line (plain text files)")
    p.add_argument("--json-key", default="text", help="the text field of .jsonl inputs (default: text)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.bin / PREFIX.idx")


def _megatron_data():
    """megatron/data.py, imported once the arguments are known good: Megatron's import notices
    (TE/Apex, absl) say nothing here, and a mistake is one line without them."""
    from megatron_moe_probe.quiet import quiet_cpu_notices

    quiet_cpu_notices()  # before megatron.core is imported
    from megatron_moe_probe.megatron import data

    return data


@contextlib.contextmanager
def _output_folder(folder: Path):
    """The output folder, created when missing (and removed again, if still empty, on failure),
    written by one build at a time (record/lock.py: a second one is refused naming the first)."""
    from megatron_moe_probe.record import lock_run_folder, release_lock

    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    blocker = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise UsageError(f"the output folder {folder} cannot be made: {blocker} is a file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the output folder {folder}: {exc.strerror or exc}") from None
    try:
        lock_run_folder(folder)
        try:
            yield folder
        finally:
            release_lock(folder)
    except BaseException:
        for made in missing:
            with contextlib.suppress(OSError):
                made.rmdir()
        raise


def run(args: argparse.Namespace) -> int:
    progress = not args.no_progress and sys.stderr.isatty()
    if args.domains:
        if args.input or args.output_prefix:
            raise UsageError("--domains builds its own inputs: give it without --input / --output-prefix")
        if not 0 < args.max_mb <= 1e6:
            raise UsageError(f"--max-mb must be above 0 and at most 1000000, got {args.max_mb}")
        with _output_folder(Path(args.domains)):
            data = _megatron_data()
            results = data.build_domains(args.domains, int(args.max_mb * 1e6), tokenizer=args.tokenizer,
                                         seed=args.seed, progress=progress)
        for r in results:
            print(f"wrote {r.prefix}.bin / .idx: {r.documents} documents, {r.tokens} tokens, {r.dtype}")
        print("train on the blend with: " + " ".join(data.blend_arguments(results)) + " "
              + " ".join(results[0].tokenizer.train_args))
        return 0
    if not args.input or not args.output_prefix:
        raise UsageError("build-dataset needs --input and --output-prefix (or --domains DIR)")
    for item in args.input:
        if not os.path.exists(item):
            raise UsageError(f"--input {item}: no such file or folder")
    if args.output_prefix.endswith(("/", os.sep)) or os.path.isdir(args.output_prefix):
        raise UsageError(f"--output-prefix {args.output_prefix}: a folder; name the files, e.g. "
                         f"{os.path.join(args.output_prefix, 'mydata')}")
    with _output_folder(Path(os.path.abspath(args.output_prefix)).parent):
        data = _megatron_data()
        result = data.build(args.input, args.output_prefix, tokenizer=args.tokenizer, append_eod=args.append_eod,
                            split_lines=args.split_lines, json_key=args.json_key, progress=progress,
                            overwrite=args.overwrite)
    print(f"wrote {result.prefix}.bin / .idx: {result.documents} documents, {result.tokens} tokens "
          f"from {result.files} file(s), {result.dtype}, tokenizer {result.tokenizer.name} "
          f"(vocab {result.tokenizer.vocab_size}, EOD {result.tokenizer.eod})")
    print("train on it with: --data-path " + result.prefix + " " + " ".join(result.tokenizer.train_args))
    return 0
