"""Dispatcher selection: the seed's table rows, the availability gate, hardware detection, CLI.

Expected answers in the seed-row tests are written from the seed text
(/work/shared/seeds/002_9900716ac1e18132.txt), not read from the card, so a card edit
that changes an answer fails here.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import types

import pytest

from megatron_moe_probe.cli import main as cli_main
from megatron_moe_probe.errors import UsageError
from megatron_moe_probe.selection.availability import assumed, probe, version_at_least
from megatron_moe_probe.selection.card import default_card
from megatron_moe_probe.selection.hardware import detect_gpus, resolve_topology
from megatron_moe_probe.selection.recommend import Query, recommend

CARD = default_card()
ALL = assumed(CARD, {"deepep", "hybridep", "ncclep", "permute-fusion"})
NONE = assumed(CARD, set())


def q(hardware, ep, nodes=1, gpn=8, model="other", stage="performance", **kw):
    nvl = 72 if hardware in ("GB200", "GB300") else gpn
    return Query(hardware=hardware, ep=ep, model=model, stage=stage, gpus_per_node=gpn, nodes=nodes,
                 nvlink_domain=nvl, **kw)


# --- the seed's tables, row by row --------------------------------------------------------

# "By hardware" table
BY_HARDWARE = [
    pytest.param(q("H100", 64, nodes=8), "deepep", id="H100: DeepEP"),
    pytest.param(q("B200", 64, nodes=8), "deepep", id="B200: DeepEP"),
    pytest.param(q("GB200", 16, nodes=4, gpn=4), "hybridep", id="GB200 NVL72: HybridEP"),
    pytest.param(q("GB300", 16, nodes=4, gpn=4), "hybridep", id="GB300 NVL72: HybridEP"),
    pytest.param(q("unknown", 16, nodes=2), "alltoall", id="Unknown: alltoall"),
    pytest.param(q("H100", 16, nodes=2, stage="bring-up"), "alltoall", id="first bring-up: alltoall"),
    pytest.param(q("GB200", 64, nodes=16, gpn=4, model="deepseek-v3", stage="bring-up"), "alltoall", id="bring-up beats model row"),
]

# "Model-Family Patterns" table
BY_MODEL = [
    pytest.param(q("GB200", 64, nodes=16, gpn=4, model="dsv3"), "hybridep", id="DSV3 on GB200: HybridEP"),
    pytest.param(q("GB300", 64, nodes=16, gpn=4, model="dsv3"), "hybridep", id="DSV3 on GB300: HybridEP"),
    pytest.param(q("H100", 64, nodes=128, model="dsv3"), "deepep", id="DSV3 on H100: DeepEP"),
    pytest.param(q("H100", 32, nodes=32, model="qwen3-235b"), "deepep", id="Qwen3 235B on H100: DeepEP"),
    pytest.param(q("GB200", 32, nodes=64, gpn=4, model="qwen3-235b"), "hybridep", id="Qwen3 235B on GB200: HybridEP"),
    pytest.param(q("H100", 16, nodes=2, model="qwen3-30b"), "deepep", id="Qwen3 30B: DeepEP (EP16)"),
    pytest.param(q("H100", 8, nodes=1, model="qwen3-30b"), "deepep", id="Qwen3 30B: DeepEP (EP8, small EP)"),
    pytest.param(q("GB200", 64, nodes=16, gpn=4, model="qwen3-next", precision="fp8"), "hybridep", id="Qwen3-Next FP8: HybridEP"),
    pytest.param(q("GB200", 64, nodes=16, gpn=4, model="qwen3-next", memory_tight=True), "hybridep", id="Qwen3-Next memory-tight: HybridEP"),
    pytest.param(q("H100", 16, nodes=2, model="vlm", stage="bring-up"), "alltoall", id="MoE VLM: start simple"),
    pytest.param(q("GB200", 16, nodes=4, gpn=4, model="vlm"), "hybridep", id="MoE VLM on GB200: test HybridEP"),
]

# "By EP degree" table
BY_EP = [
    pytest.param(q("H100", 16, nodes=2), "deepep", id="Medium EP: DeepEP"),
    pytest.param(q("GB200", 64, nodes=16, gpn=4), "hybridep", id="Large EP on NVL72: HybridEP"),
]


@pytest.mark.parametrize("query,expected", BY_HARDWARE + BY_MODEL + BY_EP)
def test_seed_table_rows(query, expected):
    query = Query(**{**query.__dict__, "model": CARD.resolve_model(query.model)})
    rec = recommend(query, CARD, ALL)
    assert rec.first_choice == expected
    assert rec.use == expected  # everything installed: no fallback
    assert rec.rule is not None and rec.rule.why  # it explains itself


@pytest.mark.parametrize("hardware,ep,gpn", [("H100", 4, 8), ("H100", 8, 8), ("B200", 2, 8), ("H200", 8, 8)])
def test_seed_small_ep_is_alltoall_or_deepep(hardware, ep, gpn):
    # Seed: "Small EP: dispatcher choice is usually second-order; start with alltoall or DeepEP"
    rec = recommend(q(hardware, ep, gpn=gpn), CARD, ALL)
    assert {rec.first_choice, *rec.also_measure} == {"alltoall", "deepep"}
    assert rec.ep_class == "small"


def test_seed_qwen3_next_bf16_is_a_close_race():
    # Seed: "Close race in BF16 ... Good reminder to test, not assume"
    rec = recommend(q("GB200", 64, nodes=16, gpn=4, model="qwen3-next", precision="bf16"), CARD, ALL)
    assert {rec.first_choice, *rec.also_measure} == {"alltoall", "hybridep"}


def test_seed_smoke_run_availability_gate():
    # Seed evidence: Qwen3 30B A3B, H100, 16 GPUs, EP=16; DeepEP and HybridEP not installed;
    # alltoall completed. recommend must name DeepEP as the choice, flag it missing, use alltoall.
    rec = recommend(q("H100", 16, nodes=2, model="qwen3-30b"), CARD, NONE)
    assert rec.first_choice == "deepep" and not rec.first_choice_available
    assert rec.use == "alltoall" and rec.fallback_used
    assert any("NOT INSTALLED" in w and "DeepEP" in w for w in rec.warnings)
    assert set(rec.flags) == {"deepep", "alltoall"}
    assert rec.flags["alltoall"].megatron_lm[:2] == ["--moe-token-dispatcher-type", "alltoall"]
    ev = {e.id: e for e in CARD.evidence}["qwen3-30b-a3b-h100-smoke"]
    assert ev.model_extra["gpus"] == 16 and ev.model_extra["ep"] == 16
    assert ev.model_extra["results"][0]["mean_step_time_s_after_warmup"] == 45.65


def test_explains_itself_with_cited_rows():
    rec = recommend(q("H100", 32, nodes=32, model="qwen3-235b"), CARD, ALL)
    assert rec.cited_rows == ["by_model:Qwen3 235B"]
    row = CARD.table_row(rec.cited_rows[0])
    assert "DeepEP on H100" in row.text
    # the hardware row also matches and agrees
    assert any(r.id == "hardware-hopper" and r.choose == "deepep" for r in rec.other_matching_rules)


# --- availability gate -------------------------------------------------------------------------

INPUT_GRID = list(itertools.product(
    ["H100", "H200", "B200", "GB200", "GB300", "unknown"], [1, 2, 8, 16, 64],
    ["dsv3", "qwen3-235b", "qwen3-30b", "qwen3-next", "vlm", "other"], ["bring-up", "performance"], ["bf16", "fp8"],
))


@pytest.mark.parametrize("installed", [set(), {"deepep"}, {"hybridep"}, {"deepep", "hybridep", "ncclep"}])
def test_never_recommends_a_missing_backend_silently(installed):
    avail = assumed(CARD, installed)
    for hw, ep, model, stage, prec in INPUT_GRID:
        gpn = 4 if hw.startswith("GB") else 8
        nodes = max(1, ep // gpn)
        rec = recommend(q(hw, ep, nodes=nodes, gpn=gpn, model=model, stage=stage, precision=prec), CARD, avail)
        assert avail.is_available(rec.use), (hw, ep, model, stage)
        if not rec.first_choice_available:
            assert rec.use == "alltoall"
            assert any("NOT INSTALLED" in w for w in rec.warnings)
        assert rec.first_choice != "ncclep" and rec.first_choice != "allgather"  # never picked automatically


def _fake_importer(modules: dict[str, object]):
    def imp(name):
        if name in modules:
            m = modules[name]
            if isinstance(m, Exception):
                raise m
            return m
        raise ModuleNotFoundError(f"No module named {name!r}")
    return imp


def test_probe_mirrors_megatron_imports():
    deep_ep = types.SimpleNamespace(Buffer=object)  # a DeepEP build without the hybrid-ep branch
    utils = types.SimpleNamespace(EventHandle=object, EventOverlap=object)
    te = types.SimpleNamespace(__version__="2.4.0+abc")
    imp = _fake_importer({"deep_ep": deep_ep, "deep_ep.utils": utils, "transformer_engine": te})
    avail = probe(CARD, importer=imp, version_of=lambda n: "1.2.0" if n.replace("-", "_") == "deep_ep" else (_ for _ in ()).throw(Exception()))
    assert avail.is_available("deepep") and avail.backends["deepep"].version == "1.2.0"
    assert not avail.is_available("hybridep")
    assert "HybridEPBuffer" in avail.backends["hybridep"].detail
    assert "HybridEP is not installed" in avail.backends["hybridep"].detail
    assert not avail.is_available("ncclep")  # transformer_engine.pytorch.ep missing
    assert avail.is_available("alltoall") and avail.is_available("allgather")
    assert avail.permute_fusion and avail.te_version == "2.4.0+abc"


def test_probe_import_errors_and_old_te():
    imp = _fake_importer({"deep_ep": OSError("libcuda.so.1: cannot open shared object file"),
                          "transformer_engine": types.SimpleNamespace(__version__="2.0.3"),
                          "transformer_engine.pytorch.ep": types.SimpleNamespace()})
    avail = probe(CARD, importer=imp, version_of=lambda n: (_ for _ in ()).throw(Exception()))
    assert not avail.is_available("deepep") and "OSError" in avail.backends["deepep"].detail
    assert avail.is_available("ncclep")
    assert not avail.permute_fusion and "2.0.3 < 2.1.0" in avail.permute_fusion_detail


def test_probe_on_this_machine_runs():
    avail = probe(CARD)
    assert avail.is_available("alltoall")
    for name, st in avail.backends.items():
        assert st.detail


@pytest.mark.parametrize("v,ok", [("2.1.0", True), ("2.1", True), ("2.0.9", False), ("2.10.0.dev0+x", True), (None, False), ("1.13", False)])
def test_version_at_least(v, ok):
    assert version_at_least(v, "2.1.0") is ok


def test_permute_fusion_flag_follows_gate():
    with_pf = recommend(q("H100", 16, nodes=2), CARD, ALL)
    without = recommend(q("H100", 16, nodes=2), CARD, assumed(CARD, {"deepep"}))
    assert "--moe-permute-fusion" in with_pf.flags["deepep"].megatron_lm
    assert with_pf.flags["deepep"].bridge["model.moe_permute_fusion"] is True
    assert "--moe-permute-fusion" not in without.flags["deepep"].megatron_lm
    assert without.flags["deepep"].bridge["model.moe_permute_fusion"] is False
    assert any("permute fusion off" in w for w in without.warnings)


def test_hybridep_env_and_sms():
    rec = recommend(q("GB200", 64, nodes=16, gpn=4, model="dsv3"), CARD, ALL)
    fs = rec.flags["hybridep"]
    assert fs.env == {"NUM_OF_HYBRID_EP_RANKS_PER_NVLINK_DOMAIN": "64"}
    i = fs.megatron_lm.index("--moe-flex-dispatcher-num-sms")
    assert fs.megatron_lm[i + 1] == "16"  # seed: HybridEP default 16 SMs
    i = rec.flags["alltoall"].megatron_lm
    assert "--moe-flex-dispatcher-backend" not in i


def test_forced_backend_missing_is_an_error():
    with pytest.raises(UsageError, match="forced but is not installed"):
        recommend(Query(**{**q("H100", 16, nodes=2).__dict__, "force": "deepep"}), CARD, NONE)
    rec = recommend(Query(**{**q("H100", 16, nodes=2).__dict__, "force": "allgather"}), CARD, NONE)
    assert rec.use == "allgather" and rec.rule is None


# --- hardware detection --------------------------------------------------------------------------

def test_detect_via_pynvml():
    class NVML:
        def nvmlInit(self): pass
        def nvmlShutdown(self): pass
        def nvmlDeviceGetCount(self): return 8
        def nvmlDeviceGetHandleByIndex(self, i): return i
        def nvmlDeviceGetName(self, h): return b"NVIDIA H100 80GB HBM3"
    d = detect_gpus(importer=_fake_importer({"pynvml": NVML()}))
    assert d.method == "pynvml" and len(d.gpu_names) == 8
    topo = resolve_topology(CARD, "auto", None, 2, detector=lambda: d)
    assert (topo.hardware, topo.gpus_per_node, topo.nvlink_domain, topo.nodes) == ("H100", 8, 8, 2)


def test_detect_via_nvidia_smi_gb200_is_not_b200():
    def run(cmd, **kw):
        assert cmd[1:] == ["--query-gpu=name", "--format=csv,noheader"]
        return subprocess.CompletedProcess(cmd, 0, "NVIDIA GB200\n" * 4, "")
    d = detect_gpus(importer=_fake_importer({}), run=run, which=lambda n: "/usr/bin/nvidia-smi")
    assert d.method == "nvidia-smi"
    topo = resolve_topology(CARD, "auto", None, 16, detector=lambda: d)
    assert (topo.hardware, topo.gpus_per_node, topo.nvlink_domain) == ("GB200", 4, 72)


def test_no_gpu_asks_for_hardware():
    d = detect_gpus(importer=_fake_importer({}), which=lambda n: None)
    assert not d.ok and "pynvml" in d.detail and "nvidia-smi" in d.detail
    with pytest.raises(UsageError, match="pass --hardware"):
        resolve_topology(CARD, "auto", None, 1, detector=lambda: d)


@pytest.mark.parametrize("name,hw", [("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H200", "H200"), ("NVIDIA B200", "B200"),
                                     ("NVIDIA GB200", "GB200"), ("NVIDIA GB300", "GB300"), ("gb200-nvl72", "GB200")])
def test_gpu_names(name, hw):
    assert CARD.resolve_hardware(name) == hw


# --- CLI ------------------------------------------------------------------------------------------

def run_cli(capsys, *argv):
    rc = cli_main(["recommend", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_text_explains_and_gives_flags(capsys):
    rc, out, err = run_cli(capsys, "--hardware", "H100", "--ep", "16", "--nodes", "2", "--model", "qwen3-30b-a3b",
                           "--assume-installed", "none")
    assert rc == 0, err
    assert "Dispatcher: alltoall" in out and "NOT INSTALLED" in out
    assert "qwen3-30b" in out and "Qwen3 30B" in out          # the rule and the seed row it encodes
    assert "--moe-flex-dispatcher-backend deepep" in out         # first choice's flags
    assert "model.moe_token_dispatcher_type=alltoall" in out     # fallback's Bridge overrides


def test_cli_json(capsys):
    rc, out, _ = run_cli(capsys, "--hardware", "GB200", "--ep", "64", "--model", "deepseek-v3", "--assume-installed", "all", "--json")
    assert rc == 0
    d = json.loads(out)
    assert d["use"] == "hybridep" and d["decided_by"]["rule"] == "dsv3-nvl72"
    assert d["query"]["num_experts"] == 256  # from the deepseek-v3 recipe
    assert d["flags"]["hybridep"]["env"]["NUM_OF_HYBRID_EP_RANKS_PER_NVLINK_DOMAIN"] == "64"


@pytest.mark.parametrize("argv,msg", [
    (["--hardware", "TPUv5", "--ep", "8"], "unknown hardware"),
    (["--hardware", "H100", "--ep", "8", "--model", "gpt-9"], "unknown model"),
    (["--hardware", "H100", "--ep", "3", "--model", "qwen3-30b-a3b"], "does not divide the 128 experts"),
    (["--hardware", "H100", "--ep", "6", "--num-experts", "64"], "does not divide"),
    (["--hardware", "H100", "--ep", "32", "--nodes", "2", "--gpus-per-node", "8"], "larger than the world"),
    (["--hardware", "H100", "--ep", "16", "--nodes", "2", "--backend", "hybridep", "--assume-installed", "deepep"], "not installed"),
    (["--hardware", "H100", "--ep", "16", "--nodes", "2", "--backend", "fancy"], "unknown backend"),
    (["--hardware", "H100", "--ep", "16", "--nodes", "2", "--assume-installed", "deepep,magic"], "unknown backend"),
    (["--hardware", "H100", "--ep", "0"], "--ep must be >= 1"),
])
def test_cli_bad_input_exit_2(capsys, argv, msg):
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2
    assert msg in err and out == ""


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine can detect its hardware")
def test_cli_auto_on_cpu_machine_asks_for_hardware(capsys):
    try:
        import pynvml  # noqa: F401
        pytest.skip("pynvml installed")
    except ImportError:
        pass
    rc, out, err = run_cli(capsys, "--ep", "8")
    assert rc == 2 and "cannot detect" in err and "--hardware" in err
