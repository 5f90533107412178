"""The package's shape, checked from its source (AST): no import cycles, the CLI imported by
nothing in the library, Megatron imported only where it is allowed, the skill's card copy in step."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_moe_probe"
NAME = "megatron_moe_probe"

# Library modules that may use argparse, and why.
ARGPARSE_ALLOWED = {
    # add_probe_args extends Megatron's own parser (a public entry point Megatron scripts call).
    f"{NAME}.megatron.flags",
    # `python -m megatron_moe_probe.selection.card --write-skill`: the skill's maintenance tool.
    f"{NAME}.selection.card",
}
# Where Megatron itself may be imported: the live adapter and worker, and the CPU harness.
MEGATRON_ALLOWED = (f"{NAME}.megatron", f"{NAME}.cpu")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of the file (lazy imports are arrows too)."""
    tree = ast.parse(path.read_text(), str(path))
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        out.update(_imported_names(node, package))
    return out


def _imported_names(node: ast.AST, package: str) -> set[str]:
    """The modules one import statement names (none for any other node)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if not isinstance(node, ast.ImportFrom):
        return set()
    base = node.module or ""
    if node.level:
        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
    # `from pkg import mod` imports the submodule when there is one.
    return {base} | {f"{base}.{alias.name}" for alias in node.names}


def package_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        graph[name] = {m for m in imports_of(path) if m in files and m != name}
    return graph


def test_every_module_has_an_import_graph_entry():
    graph = package_graph()
    assert f"{NAME}.record" in graph and f"{NAME}.commands.compare" in graph
    assert f"{NAME}.offline.compare" in graph[f"{NAME}.commands.compare"]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the package (list of modules, first repeated at the end), or None.
    A package's __init__ importing its own submodules is not an arrow back to the package."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if node.startswith(nxt + "."):  # a submodule importing its parent package's __init__
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_package():
    assert find_cycle(package_graph()) is None


def library_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")
            if not module_name(p).startswith(f"{NAME}.commands") and module_name(p) != f"{NAME}.cli"}


def test_no_library_module_imports_the_cli_or_the_commands():
    bad = {name: sorted(m for m in imports_of(path) if m == f"{NAME}.cli" or m.startswith(f"{NAME}.commands"))
           for name, path in library_modules().items()}
    assert {k: v for k, v in bad.items() if v} == {}


def test_no_library_module_parses_arguments():
    """argparse (and so argparse.Namespace parameters) belongs to commands/ and cli.py."""
    bad = sorted(name for name, path in library_modules().items()
                 if "argparse" in imports_of(path) and name not in ARGPARSE_ALLOWED)
    assert bad == []


def test_megatron_is_imported_only_by_the_adapter_and_the_cpu_harness():
    bad = {}
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        if name.startswith(MEGATRON_ALLOWED):
            continue
        hits = sorted(m for m in imports_of(path) if m == "megatron" or m.startswith("megatron."))
        if hits:
            bad[name] = hits
    assert bad == {}


def test_the_skill_folder_card_is_the_package_card():
    """The package's card (what the code reads, shipped in the wheel) is the source; the skill
    folder keeps a copy for agents that read the skill on its own."""
    from megatron_moe_probe.selection.card import CARD_PATH, SKILL_CARD_COPY

    assert CARD_PATH.is_relative_to(PACKAGE)
    if SKILL_CARD_COPY.read_bytes() != CARD_PATH.read_bytes():
        pytest.fail(f"{SKILL_CARD_COPY} differs from {CARD_PATH}; edit the package card and copy it: "
                    f"cp {CARD_PATH} {SKILL_CARD_COPY}")


def test_record_names_cover_what_the_console_shows():
    from megatron_moe_probe.record import KNOWN_STATS
    from megatron_moe_probe.writers.console import COLUMNS, TIMING_COLUMNS

    assert [key for _, key, _ in (*COLUMNS, *TIMING_COLUMNS) if key not in KNOWN_STATS] == []


# ---------------------------------------------------------------------------- offline and analysis

def top_level_imports(path: Path) -> set[str]:
    """What importing `path` imports at once: module-level statements only (not inside functions)."""
    tree = ast.parse(path.read_text(), str(path))
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    out: set[str] = set()
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.If, ast.Try)):  # `if TYPE_CHECKING:` / try-except imports still run
            todo.extend(node.body + node.orelse + getattr(node, "finalbody", []) +
                        [s for h in getattr(node, "handlers", []) for s in h.body])
        else:
            out.update(_imported_names(node, package))
    return out


def _is_heavy_name(name: str) -> bool:
    return name.split(".")[0] in ("torch", "megatron") or name.startswith(f"{NAME}.megatron.") or \
        name == f"{NAME}.megatron"


def heavy_modules() -> set[str]:
    """Package modules whose import loads torch or Megatron (following module-level imports,
    parents' __init__ included, through the package)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    direct = {name: top_level_imports(path) for name, path in files.items()}

    def parents(name: str) -> list[str]:
        parts = name.split(".")
        return [".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in files]

    heavy = {name for name, deps in direct.items() if any(_is_heavy_name(d) for d in deps)}
    changed = True
    while changed:
        changed = False
        for name, deps in direct.items():
            if name in heavy:
                continue
            reached = {d for d in deps if d in files} | {p for d in deps if d in files for p in parents(d)}
            if reached & heavy or set(parents(name)) & heavy:
                heavy.add(name)
                changed = True
    return heavy


def test_heavy_modules_finds_torch_users():
    heavy = heavy_modules()
    assert f"{NAME}.stats" in heavy and f"{NAME}.summarize" in heavy and f"{NAME}.megatron.hooks" in heavy
    assert f"{NAME}.record" not in heavy and f"{NAME}.offline.compare" not in heavy


def test_offline_imports_no_torch_and_nothing_of_megatron():
    """docs/architecture.md: offline/ reads runs without torch or Megatron. Every import of an
    offline module, inside functions included, must be of a module whose import loads neither."""
    heavy = heavy_modules()
    bad = {}
    for path in (PACKAGE / "offline").rglob("*.py"):
        hits = sorted(m for m in imports_of(path) if _is_heavy_name(m) or m in heavy)
        if hits:
            bad[module_name(path)] = hits
    assert bad == {}


def test_analysis_imports_nothing_of_megatron():
    bad = {}
    for path in (PACKAGE / "analysis").rglob("*.py"):
        hits = sorted(m for m in imports_of(path) if m.split(".")[0] == "megatron" or m == f"{NAME}.megatron"
                      or m.startswith(f"{NAME}.megatron."))
        if hits:
            bad[module_name(path)] = hits
    assert bad == {}


def test_record_and_offline_import_without_torch():
    """The same rule, measured: importing them in a fresh interpreter loads no torch."""
    import subprocess
    import sys

    modules = ["megatron_moe_probe.record", *sorted(module_name(p) for p in (PACKAGE / "offline").rglob("*.py"))]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules) +
            "print(sorted(m for m in ('torch', 'megatron.core') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---- the live side's own rules (docs/architecture.md, "What may import what") ------------------

LIVE_CORE = (f"{NAME}.session", f"{NAME}.accumulator", f"{NAME}.colsum", f"{NAME}.stats", f"{NAME}.summarize",
             f"{NAME}.integrity", f"{NAME}.router_health", f"{NAME}.settings")
LIVE_ADAPTER = (f"{NAME}.megatron.bridge", f"{NAME}.megatron.training", f"{NAME}.megatron.hooks",
                f"{NAME}.megatron.timing")
PLANNER = (f"{NAME}.recipes", f"{NAME}.selection")


def _imports_matching(modules: tuple[str, ...], forbidden) -> dict[str, list[str]]:
    bad = {}
    for name, path in library_modules().items():
        if not name.startswith(modules):
            continue
        hits = sorted(m for m in imports_of(path) if forbidden(name, m))
        if hits:
            bad[name] = hits
    return bad


def test_production_modules_never_import_the_cpu_harness():
    """cpu/ rebinds torch.cuda process-wide: megatron/ (the training path) must not pull it in."""
    assert _imports_matching((f"{NAME}.megatron",), lambda _, m: m.startswith(f"{NAME}.cpu")) == {}


def test_the_planner_never_imports_the_live_adapter():
    """recipes.py and selection/ render text about the live side; they never import it."""
    assert _imports_matching(PLANNER, lambda _, m: m.startswith(LIVE_ADAPTER)) == {}


def test_the_live_core_is_framework_neutral():
    """session, accumulator, kernel, statistics and summary import no Megatron; only the session's
    factory may name the Megatron adapter (its default hooks), and nothing in the core imports
    the training integration, the Bridge callback or the CPU harness."""
    def forbidden(name: str, m: str) -> bool:
        if m == "megatron" or m.startswith("megatron.") or m.startswith(f"{NAME}.cpu"):
            return True
        if m.startswith(f"{NAME}.megatron"):
            adapter = f"{NAME}.megatron.hooks"
            return not (name == f"{NAME}.session" and (m == adapter or m.startswith(adapter + ".")))
        return False

    assert _imports_matching(LIVE_CORE, forbidden) == {}


def test_one_session_factory_serves_every_entry_point():
    """install(), the Bridge callback and the demo all make their session with open_session."""
    for module in ("megatron.training", "megatron.bridge", "cpu.demo"):
        source = (PACKAGE / (module.replace(".", "/") + ".py")).read_text()
        assert "open_session(" in source, module
        assert "ProbeSession(" not in source and "make_writers(" not in source, module
