"""Local text files -> a Megatron indexed dataset (PREFIX.bin / PREFIX.idx); `moe-probe build-dataset`.

The files are written by Megatron-Core's own `IndexedDatasetBuilder`, so `--data-path PREFIX`
reads them with `GPTDataset` as it would any other Megatron dataset.

Documents: one per file (default), one per non-empty line (`--split-lines`), or one per JSON
line's `text` field (files ending in `.jsonl`, key set with `--json-key`). Folders are read
recursively (sorted, hidden files skipped).

Tokenizers (both offline):
  bytes            each UTF-8 byte is a token (0..255), end-of-document is 256. Train with
                   `--tokenizer-type NullTokenizer --vocab-size 257`: Megatron's NullTokenizer
                   then has exactly that vocabulary and EOD id (vocab_size - 1 = 256).
  hf:DIR           a HuggingFace tokenizer from a local folder (needs `transformers`; never
                   downloads). Train with `--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR`.

Both files are written under temporary names next to PREFIX and renamed into place only
when everything succeeded: a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy

from megatron_moe_probe.dataset_files import require_dataset  # noqa: F401 - its home before; callers import it here
from megatron_moe_probe.errors import UsageError

BYTE_VOCAB = 257          # 256 byte values + EOD
BYTE_EOD = 256


@dataclass
class Tokenizer:
    name: str
    encode: Callable[[bytes], list[int]]
    eod: int
    vocab_size: int
    train_args: list[str]


def byte_tokenizer() -> Tokenizer:
    return Tokenizer("bytes", lambda raw: list(raw), BYTE_EOD, BYTE_VOCAB,
                     ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(BYTE_VOCAB)])


def hf_tokenizer(folder: str) -> Tokenizer:
    if not os.path.isdir(folder):
        raise UsageError(f"--tokenizer hf:{folder}: no such folder (a local HuggingFace tokenizer folder; nothing is downloaded)")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UsageError("--tokenizer hf:DIR needs the `transformers` package, which is not installed "
                         "(pip install transformers); --tokenizer bytes needs nothing") from None
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    eod = tok.eos_token_id
    if eod is None:
        raise UsageError(f"--tokenizer hf:{folder}: the tokenizer has no eos token to end documents with")

    def encode(raw: bytes) -> list[int]:
        return tok(raw.decode("utf-8"), add_special_tokens=False)["input_ids"]

    return Tokenizer(f"hf:{folder}", encode, int(eod), len(tok),
                     ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", folder])


def make_tokenizer(spec: str) -> Tokenizer:
    if spec == "bytes":
        return byte_tokenizer()
    if spec.startswith("hf:") and len(spec) > 3:
        return hf_tokenizer(spec[3:])
    raise UsageError(f"--tokenizer: unknown tokenizer {spec!r}; choose 'bytes' or 'hf:LOCAL_DIR'")


def optimal_dtype(vocab_size: int) -> type:
    """The dtype Megatron itself picks (indexed_dataset.DType.optimal_dtype)."""
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


# -- inputs -------------------------------------------------------------------------------------

def expand_inputs(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*")
                if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            if not found:
                raise UsageError(f"--input {item}: folder has no files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise UsageError(f"--input {item}: no such file or folder")
    if not files:
        raise UsageError("--input: give at least one file or folder")
    return files


def iter_documents(path: Path, split_lines: bool, json_key: str) -> Iterator[bytes]:
    """The documents of one file, as UTF-8 bytes; empty documents are skipped."""
    raw = path.read_bytes()
    if path.suffix == ".jsonl":
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{path}:{n}: not JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or json_key not in obj:
                raise UsageError(f"{path}:{n}: no {json_key!r} field (set the key with --json-key)")
            text = obj[json_key]
            if not isinstance(text, str):
                raise UsageError(f"{path}:{n}: field {json_key!r} is {type(text).__name__}, expected a string")
            if text:
                yield text.encode("utf-8")
    elif split_lines:
        for line in raw.splitlines():
            if line.strip():
                yield line
    elif raw:
        yield raw


# -- building -----------------------------------------------------------------------------------

@dataclass
class BuildResult:
    prefix: str
    documents: int
    tokens: int
    files: int
    dtype: str
    tokenizer: Tokenizer


def build(inputs: list[str], output_prefix: str, tokenizer: str = "bytes", append_eod: bool = False,
          split_lines: bool = False, json_key: str = "text", progress: bool = True,
          overwrite: bool = False) -> BuildResult:
    """Build PREFIX.bin / PREFIX.idx with Megatron's IndexedDatasetBuilder; atomic. An existing
    PREFIX.bin or PREFIX.idx is replaced only with `overwrite` (else UsageError, nothing changed)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

    prefix = os.path.abspath(output_prefix)
    out_dir = os.path.dirname(prefix)
    if not os.path.isdir(out_dir):
        raise UsageError(f"--output-prefix: folder {out_dir} does not exist")
    existing = [p for p in (get_bin_path(prefix), get_idx_path(prefix)) if os.path.lexists(p)]
    if existing and not overwrite:
        raise UsageError(f"--output-prefix {output_prefix}: {' and '.join(existing)} already exist(s); choose "
                         "another prefix, or add --overwrite to replace them on purpose")
    if not os.access(out_dir, os.W_OK):
        raise UsageError(f"--output-prefix: folder {out_dir} is not writable")
    outputs = {Path(get_bin_path(prefix)).resolve(), Path(get_idx_path(prefix)).resolve()}
    files = [f for f in expand_inputs(inputs) if f.resolve() not in outputs]  # a rebuild in place
    tok = make_tokenizer(tokenizer)
    dtype = optimal_dtype(tok.vocab_size)

    # Temp prefix in the same folder, so the final rename is atomic (same filesystem).
    tmp_prefix = tempfile.mkdtemp(dir=out_dir, prefix=f".{os.path.basename(prefix)}.")
    tmp_bin, tmp_idx = os.path.join(tmp_prefix, "data.bin"), os.path.join(tmp_prefix, "data.idx")
    documents = tokens = 0
    try:
        builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
        try:
            with _progress(progress, sum(f.stat().st_size for f in files)) as advance:
                for f in files:
                    for doc in iter_documents(f, split_lines, json_key):
                        try:
                            ids = tok.encode(doc)
                        except UnicodeDecodeError as exc:
                            raise UsageError(f"{f}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
                        if append_eod:
                            ids.append(tok.eod)
                        if not ids:
                            continue
                        builder.add_document(numpy.asarray(ids, dtype=dtype), [len(ids)])
                        documents += 1
                        tokens += len(ids)
                    advance(f.stat().st_size, f.name)
        finally:
            if not builder.data_file.closed:
                builder.data_file.close()
        if documents == 0:
            raise UsageError(f"no text in {', '.join(inputs)}: every document was empty; nothing written")
        builder.finalize(tmp_idx)
        os.replace(tmp_bin, get_bin_path(prefix))
        os.replace(tmp_idx, get_idx_path(prefix))
    finally:
        for leftover in (tmp_bin, tmp_idx):
            if os.path.exists(leftover):
                os.unlink(leftover)
        os.rmdir(tmp_prefix)
    return BuildResult(prefix, documents, tokens, len(files), numpy.dtype(dtype).name, tok)


class _progress:
    """A rich progress bar on stderr (bytes read), or nothing."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self._p = enabled, total, None

    def __enter__(self):
        if not self.enabled:
            return lambda n, name: None
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        self._p = Progress(TextColumn("[bold]tokenizing[/] {task.description}"), BarColumn(), DownloadColumn(),
                           TimeRemainingColumn(), console=Console(stderr=True), transient=True)
        self._p.__enter__()
        task = self._p.add_task("", total=self.total)
        return lambda n, name: self._p.update(task, advance=n, description=name)

    def __exit__(self, *exc):
        if self._p is not None:
            self._p.__exit__(*exc)
        return False


# -- four domains from the machine --------------------------------------------------------------

def build_domains(out_dir: str, max_bytes: int = 16_000_000, tokenizer: str = "bytes", seed: int = 0,
                  domains: tuple[str, ...] | None = None, progress: bool = False) -> list[BuildResult]:
    """OUT_DIR/<domain>.bin/.idx for each domain of `domain_text` (code, prose, math, data), each
    its own indexed dataset, ready to blend with `--data-path 1 OUT/code 1 OUT/prose ...`."""
    from megatron_moe_probe import domain_text

    os.makedirs(out_dir, exist_ok=True)
    results = []
    for domain in domains or domain_text.DOMAINS:
        docs = domain_text.domain_documents(domain, max_bytes, seed)
        if not docs:
            raise UsageError(f"domain {domain}: found no text on this machine")
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{domain}.") as tmp:
            staging = os.path.join(tmp, f"{domain}.jsonl")
            with open(staging, "w", encoding="utf-8") as f:
                for doc in docs:
                    f.write(json.dumps({"text": doc}) + "\n")
            results.append(build([staging], os.path.join(out_dir, domain), tokenizer=tokenizer, append_eod=True,
                                 progress=progress))
    return results


def blend_arguments(results: list[BuildResult]) -> list[str]:
    """`--data-path 1 PREFIX 1 PREFIX ...`: equal weights (Megatron normalizes them)."""
    out = ["--data-path"]
    for r in results:
        out += ["1", r.prefix]
    return out
