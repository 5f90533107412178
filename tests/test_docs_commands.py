"""Every `moe-probe ...` command the README and docs/ print, against the real CLI.

Each one must parse with its command's own parser. Those that need no GPU and no data of the
user's run for real (render, recommend, analyze/compare on tests/data); `train` and `matrix`
run their `--dry-run` (Megatron's parser included); `demo` and `build-dataset` are only parsed
(the fault suite and test_demo run them). Placeholders (RUN, $MASTER_ADDR, [optional parts])
are filled in with the test data. A command the docs show that no longer works fails here.
Also checked: the docs' lists of recipe variants and of the SM-count flag recommend adds.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from megatron_moe_probe import cli

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PLACEHOLDERS = {"RUN": DATA / "h200_run_mock", "RUN_A": DATA / "h200_run_mock", "RUN_B": DATA / "h200_run_text",
                "MOCK_RUN": DATA / "h200_run_mock", "runs/a": DATA / "h200_run_mock",
                "$NODE_RANK": "1", "$MASTER_ADDR": "10.0.0.1", "RECIPE": "tiny-gpu", "NAME": "tiny-gpu", "N": "2",
                "tests/data/h200_run_mock": DATA / "h200_run_mock"}
# Dataset prefixes the docs use: stand-ins (empty .bin/.idx) in the test's folder, for dry runs.
DATASETS = ("/data/textds", "/data/text")


def doc_commands() -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        text = path.read_text()
        spans = []
        for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
            spans += [line.strip().removeprefix("$ ") for line in block.replace("\\\n", " ").splitlines()]
        # Inline: whole commands, not mentions of a command (`moe-probe matrix`) or of one of its
        # flags (`moe-probe train --data-path`), nor elided sketches (`... ...`).
        spans += [s for s in re.findall(r"`(moe-probe [^`]+)`", text)
                  if len(s.split()) > 2 and "..." not in s and not (len(s.split()) <= 4 and s.split()[2].startswith("-"))]
        for span in spans:
            span = span.split("  #")[0].split(" # ")[0].strip()
            if span.startswith("moe-probe ") and span not in {c for _, c in found}:
                found.append((path.name, span))
    return found


def argv_of(command: str, datasets: Path | None = None) -> list[str]:
    command = re.sub(r"\[([^\]]*)\]", r"\1", command)  # optional parts: taken
    argv = [str(PLACEHOLDERS.get(tok, tok)) for tok in shlex.split(command)[1:] if tok != "..."]
    argv = [str(ROOT / a) if a.startswith("examples/") else a for a in argv]  # the shipped example dumps
    if datasets is not None:
        for prefix in DATASETS:
            argv = [a.replace(prefix, str(datasets / Path(prefix).name)) for a in argv]
    return argv


COMMANDS = doc_commands()


def test_the_docs_show_commands():
    names = {argv_of(c)[0] for _, c in COMMANDS}
    assert {"train", "render", "recommend", "compare", "analyze", "matrix", "build-dataset"} <= names


@pytest.mark.parametrize("where,command", COMMANDS, ids=[c for _, c in COMMANDS])
def test_every_documented_command_parses(where, command):
    import importlib

    argv = argv_of(command)
    name = argv[0]
    module = importlib.import_module(cli.COMMANDS[name][0])
    parser = cli.OneLineParser(prog=f"moe-probe {name}")
    module.add_arguments(parser)
    try:
        parser.parse_args(argv[1:])
    except SystemExit as exc:
        pytest.fail(f"{where}: `{command}` does not parse (exit {exc.code})")


def _runnable(argv: list[str], tmp_path: Path) -> list[str] | None:
    name = argv[0]
    if name in ("render", "recommend"):
        return [str(tmp_path / a) if a == "run.json" else a for a in argv]
    if name in ("analyze", "compare"):
        runs = [a for a in argv[1:] if not a.startswith("-") and "/" in a or a.startswith("wandb")]
        if any(a.startswith("wandb") or not Path(a).exists() for a in runs) or not runs:
            return None  # needs the user's own run, a wandb run or the network: parsed above
        return [str(tmp_path / a) if a.endswith(".png") else a for a in argv]
    if name == "matrix":
        head = argv[:argv.index("--")] if "--" in argv else argv
        return [*head, "--dry-run"]
    if name == "train":
        if "--data-path" in argv or any(a.startswith("--num-layers") for a in argv):
            return None  # the user's dataset / an elided raw-args example: parsed above
        head, tail = (argv[:argv.index("--")], argv[argv.index("--"):]) if "--" in argv else (argv, [])
        return [*head, *([] if "--dry-run" in head else ["--dry-run"]), "--assume-installed", "none", *tail]
    if name == "import":
        return argv if Path(argv[1]).exists() else None  # the examples/ dumps; --out lands in tmp_path
    return None  # demo, build-dataset: parsed above; run by test_demo / test_faults / their own tests


def test_the_example_dumps_are_documented_and_run():
    examples = [c for _, c in COMMANDS if "examples/" in c]
    kinds = {name for c in examples for name in ("router_trace", "tokens_per_expert") if f"examples/{name}" in c}
    assert kinds == {"router_trace", "tokens_per_expert"}
    assert {argv_of(c)[0] for c in examples} >= {"analyze", "import"}


def test_docs_cite_only_files_that_exist():
    missing = [(path.name, ref) for path in DOCS
               for ref in re.findall(r"`(megatron_moe_probe/[\w/]+\.py)`", path.read_text())
               if not (ROOT / ref).exists()]
    assert not missing, missing


def test_every_documented_command_runs(tmp_path, capsys, monkeypatch):
    pytest.importorskip("megatron.training")
    monkeypatch.chdir(tmp_path)
    for prefix in DATASETS:
        for ext in (".bin", ".idx"):
            (tmp_path / (Path(prefix).name + ext)).write_bytes(b"")
    failures = []
    for where, command in COMMANDS:
        argv = _runnable(argv_of(command, tmp_path), tmp_path)
        if argv is None:
            continue
        code = cli.main(argv)
        _, err = capsys.readouterr()
        if code != 0:
            failures.append(f"{where}: `{command}` -> exit {code}: {err.strip()[-300:]}")
    assert not failures, "\n".join(failures)


def test_the_recipe_table_lists_every_variant():
    from megatron_moe_probe.recipes import all_recipe_specs

    table = {}
    for line in (ROOT / "docs" / "recipes.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) > 2:
            table[cells[0]] = {v.strip() for v in cells[1].split(",")} - {"-"}
    variants: dict[str, set[str]] = {}
    for spec in all_recipe_specs():
        name, _, variant = spec.partition(":")
        variants.setdefault(name, set())
        if variant:
            variants[name].add(variant)
    assert {name: table.get(name) for name in variants} == variants


def test_the_dispatcher_docs_show_the_sm_flag_recommend_adds():
    from megatron_moe_probe.selection.card import default_card

    card = default_card()
    text = (ROOT / "docs" / "dispatchers.md").read_text()
    for b in card.backends:
        if b.num_sms is not None and b.num_sms.default > 0:
            assert f"{card.flex_num_sms_flag} {b.num_sms.default}" in text, b.id
