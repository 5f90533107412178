"""Recipes: schema errors, rendering, the render CLI, and Megatron's own parser on every recipe."""

from __future__ import annotations

import contextlib
import io
import json
import sys

import pytest
import yaml

from helpers import cli_in_process
from megatron_moe_probe import recipes
from megatron_moe_probe.errors import UsageError
from megatron_moe_probe.selection.availability import assumed
from megatron_moe_probe.selection.card import default_card

CARD = default_card()
NONE = assumed(CARD, set())
ALL = assumed(CARD, {"deepep", "hybridep", "ncclep"})
ALL_TE = assumed(CARD, {"deepep", "hybridep", "ncclep", "permute-fusion"})
SPECS = recipes.all_recipe_specs()
TINY = yaml.safe_load((recipes.RECIPES_DIR / "tiny-cpu.yaml").read_text())


def arg_value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


# --- the recipe set ----------------------------------------------------------------------------

def test_required_recipes_exist():
    names = set(recipes.recipe_names())
    assert {"tiny-cpu", "tiny-gpu", "qwen3-30b-a3b", "qwen3-235b-a22b", "deepseek-v2-lite", "deepseek-v3",
            "mixtral-8x7b", "olmoe-1b-7b", "qwen3-next-80b-a3b"} <= names
    assert "tiny-gpu:1gpu" in SPECS


@pytest.mark.parametrize("spec", SPECS)
def test_every_recipe_loads_renders_and_names_its_sources(spec):
    r = recipes.load_recipe(spec)
    assert r.sources.get("model"), "say where the model shape comes from"
    args = recipes.render(r, availability=NONE)
    assert arg_value(args, "--num-experts") == str(r.model.moe.num_experts)
    assert arg_value(args, "--expert-model-parallel-size") == str(r.parallelism.ep)
    assert ("--mock-data" in args) == (r.data.source == "mock")
    assert not any(a.startswith("--moe-probe") for a in args)
    full = recipes.render(r, availability=NONE, include_probe=True)
    assert full == args + recipes.probe_args(r)
    assert any(o.startswith("model.expert_model_parallel_size=") for o in recipes.bridge_overrides(r, availability=NONE))


def test_tiny_cpu_is_the_demo_model():
    r = recipes.load_recipe("tiny-cpu")
    m, p = r.model, r.parallelism
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.vocab_size, r.training.seq_length) == (2, 64, 4, 256, 64)
    assert (m.moe.num_experts, m.moe.router_topk, m.moe.ffn_hidden_size) == (8, 2, 128)
    assert (p.ep, p.world_size) == (2, 2)
    args = recipes.render(r, availability=NONE)
    assert arg_value(args, "--moe-token-dispatcher-type") == "alltoall"
    assert arg_value(args, "--transformer-impl") == "local"


def test_tiny_gpu_variants():
    two, one = recipes.load_recipe("tiny-gpu"), recipes.load_recipe("tiny-gpu:1gpu")
    assert (two.parallelism.ep, two.parallelism.world_size) == (2, 2)
    assert (one.parallelism.ep, one.parallelism.world_size) == (1, 1)
    for r in (two, one):
        args = recipes.render(r, availability=ALL)
        assert arg_value(args, "--transformer-impl") == "local" and "--mock-data" in args
        assert arg_value(args, "--hidden-size") == "1024" and arg_value(args, "--num-experts") == "32"


def test_auto_dispatcher_resolves_through_card_and_gate():
    r = recipes.load_recipe("deepseek-v3:gb200-ep64")
    with_h = recipes.resolve_dispatcher(r, ALL)
    assert with_h.backend == "hybridep" and with_h.recommendation.rule.id == "dsv3-nvl72"
    assert with_h.env["NUM_OF_HYBRID_EP_RANKS_PER_NVLINK_DOMAIN"] == "64"
    without = recipes.resolve_dispatcher(r, NONE)
    assert without.backend == "alltoall"
    assert any("NOT INSTALLED" in n for n in without.notes)  # said, not silent
    assert arg_value(recipes.render(r, resolved=without), "--moe-token-dispatcher-type") == "alltoall"


def test_recipe_permute_fusion_off_wins():
    r = recipes.load_recipe("qwen3-30b-a3b")  # the seed smoke run: model.moe_permute_fusion=false
    res = recipes.resolve_dispatcher(r, assumed(CARD, {"deepep", "permute-fusion"}))
    assert "--moe-permute-fusion" not in res.megatron_lm and res.bridge["model.moe_permute_fusion"] is False
    r2 = recipes.load_recipe("qwen3-30b-a3b:h100-ep8")
    res2 = recipes.resolve_dispatcher(r2, assumed(CARD, {"deepep", "permute-fusion"}))
    assert "--moe-permute-fusion" in res2.megatron_lm


def test_probe_args_exact():
    r = recipes.load_recipe("tiny-gpu")
    assert recipes.probe_args(r) == [
        "--moe-probe", "--moe-probe-interval", "10", "--moe-probe-dir", "runs/moe-probe/tiny-gpu",
        "--moe-probe-writers", "local,console", "--moe-probe-timing", "--moe-probe-gpus-per-node", "2",
    ]
    data = dict(TINY, probe={"enabled": True, "interval": 7, "dir": "/x", "writers": ["wandb"], "gpus_per_node": 4})
    r2 = recipes.load_recipe_data(data, "inline")
    assert recipes.probe_args(r2) == ["--moe-probe", "--moe-probe-interval", "7", "--moe-probe-dir", "/x",
                                      "--moe-probe-writers", "wandb", "--moe-probe-gpus-per-node", "4"]
    r3 = recipes.load_recipe_data(dict(TINY, probe={"enabled": False}), "inline")
    assert recipes.probe_args(r3) == []


def test_data_path_rendering():
    data = dict(TINY, data={"source": "path", "paths": ["1.0", "/d/a_text_document"], "split": "99,1,0",
                            "tokenizer": {"type": "HuggingFaceTokenizer", "model": "Qwen/Qwen3-30B-A3B"}})
    args = recipes.render(recipes.load_recipe_data(data, "inline"), availability=NONE)
    i = args.index("--data-path")
    assert args[i + 1:i + 3] == ["1.0", "/d/a_text_document"]
    assert "--mock-data" not in args and "--vocab-size" not in args
    assert arg_value(args, "--tokenizer-model") == "Qwen/Qwen3-30B-A3B"


# --- schema errors --------------------------------------------------------------------------

def _bad(**changes):
    data = yaml.safe_load(yaml.safe_dump(TINY))
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        if value is ...:
            node.pop(leaf)
        else:
            node[leaf] = value
    with pytest.raises(UsageError) as ei:
        recipes.load_recipe_data(data, "inline")
    return str(ei.value)


def test_error_names_field_and_allowed_values():
    msg = _bad(dispatcher__type="nccl")
    assert "dispatcher.type" in msg and "'auto'" in msg and "'alltoall'" in msg and "'flex'" in msg and "'nccl'" in msg
    msg = _bad(probe__writers=["local", "mlflow"])
    assert "probe.writers.1" in msg and "'tensorboard'" in msg
    msg = _bad(dispatcher__hardware="TPU")
    assert "dispatcher.hardware" in msg and "H100" in msg and "GB200" in msg
    msg = _bad(model__family="gpt")
    assert "model.family" in msg and "qwen3-30b" in msg


def test_error_unknown_field_lists_allowed_fields():
    msg = _bad(parallelism__expert_parallel=2)
    assert "parallelism.expert_parallel" in msg and "allowed fields here" in msg and "ep" in msg


def test_error_missing_field():
    msg = _bad(model__moe__num_experts=...)
    assert "model.moe.num_experts" in msg and "required" in msg.lower()


def test_error_ep_does_not_divide_experts():
    msg = _bad(parallelism__ep=3, parallelism__gpus_per_node=3, training__global_batch_size=6, training__micro_batch_size=2)
    assert "does not divide model.moe.num_experts=8" in msg and "allowed EP" in msg


def test_error_ep_larger_than_world():
    msg = _bad(parallelism__ep=4)
    assert "larger than the world" in msg


def test_error_forced_flex_needs_backend_and_installed():
    msg = _bad(dispatcher__type="flex")
    assert "needs backend" in msg
    data = dict(TINY, dispatcher={"type": "flex", "backend": "deepep", "hardware": "H100"})
    r = recipes.load_recipe_data(data, "inline")
    with pytest.raises(UsageError, match="forced but is not installed"):
        recipes.render(r, availability=NONE)


def test_error_unknown_recipe_and_variant():
    with pytest.raises(UsageError, match="unknown recipe 'nope'.*tiny-cpu"):
        recipes.load_recipe("nope")
    with pytest.raises(UsageError, match="unknown variant 'x'; allowed: 1gpu"):
        recipes.load_recipe("tiny-gpu:x")


# --- render CLI -------------------------------------------------------------------------------

def render_cli(capsys, *argv):
    return cli_in_process(capsys, "render", *argv)


def test_render_cli_json(capsys):
    rc, out, err = render_cli(capsys, "qwen3-235b-a22b:gb200-ep8", "--format", "json", "--assume-installed", "hybridep")
    assert rc == 0, err
    d = json.loads(out)
    assert d["world_size"] == 64 and d["dispatcher"]["use"] == "hybridep"
    assert arg_value(d["megatron_lm_args"], "--moe-flex-dispatcher-backend") == "hybridep"
    assert d["probe_args"][0] == "--moe-probe"


def test_render_cli_writes_out_file(capsys, tmp_path):
    out = tmp_path / "args.txt"
    rc, _, _ = render_cli(capsys, "tiny-cpu", "--out", str(out), "--no-probe")
    assert rc == 0 and "--moe-token-dispatcher-type alltoall" in out.read_text()
    assert "--moe-probe" not in out.read_text()


@pytest.mark.parametrize("content", [
    "name: broken\nmodel: [unclosed\n",                           # malformed YAML
    yaml.safe_dump(dict(TINY, name="broken", parallelism={"ep": 3, "gpus_per_node": 2})),  # EP > world, 3 !| 8
    yaml.safe_dump(dict(TINY, name="broken", dispatcher={"type": "flex", "backend": "hybridep"})),  # forced, missing
    "- just\n- a list\n",
])
def test_render_cli_bad_input_exit_2_nothing_written(capsys, tmp_path, content):
    bad = tmp_path / "broken.yaml"
    bad.write_text(content)
    out = tmp_path / "out.txt"
    out.write_text("previous content\n")
    rc, stdout, err = render_cli(capsys, str(bad), "--out", str(out), "--assume-installed", "none")
    assert rc == 2 and "error" in err and stdout == ""
    assert out.read_text() == "previous content\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.yaml", "out.txt"]  # no temp file left


def test_render_cli_unknown_recipe_exit_2(capsys, tmp_path):
    out = tmp_path / "o.txt"
    rc, _, err = render_cli(capsys, "no-such-recipe", "--out", str(out))
    assert rc == 2 and "unknown recipe" in err and not out.exists()


def test_render_cli_list(capsys):
    rc, out, _ = render_cli(capsys, "--list")
    assert rc == 0 and out.split() == SPECS


# --- Megatron's own parser on every recipe ------------------------------------------------------

ARCH = {"hopper": (9, 0), "blackwell": (10, 0), "unknown": (9, 0)}


@pytest.fixture(scope="module")
def megatron_parser():
    pytest.importorskip("megatron.training.arguments")
    import megatron.training.arguments as margs
    from megatron.training import global_vars

    return margs, global_vars


def _validate(margs, global_vars, monkeypatch, args: list[str], world: int, env: dict[str, str], cap: tuple[int, int],
              extra_args_provider=None):
    import torch

    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    # The parser asks the GPU for its compute capability (grouped GEMM, CUDA_DEVICE_MAX_CONNECTIONS):
    # answer for the recipe's hardware, since this test runs on a CPU machine.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: cap)
    monkeypatch.setattr(margs, "get_device_arch_version", lambda: cap[0])
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", *args])
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            parsed = margs.parse_and_validate_args(extra_args_provider=extra_args_provider)
            # TransformerConfig runs the MoE/flex checks; rope fusion needs transformer-engine,
            # which the CPU test machine does not have, so it is switched off for this step only.
            parsed.apply_rope_fusion = False
            config = margs.core_transformer_config_from_args(parsed)
        return parsed, config
    finally:
        global_vars.unset_global_variables()


def test_every_recipe_passes_megatron_parser(megatron_parser, monkeypatch):
    margs, global_vars = megatron_parser
    failures, checked = [], 0
    for spec in SPECS:
        r = recipes.load_recipe(spec)
        hw = CARD.hardware_entry(r.dispatcher.hardware)
        for avail in (NONE, ALL):
            resolved = recipes.resolve_dispatcher(r, avail)
            args = recipes.render(r, resolved=resolved)
            try:
                parsed, config = _validate(margs, global_vars, monkeypatch, args, r.parallelism.world_size,
                                           resolved.env, ARCH[hw.arch])
            except BaseException as exc:  # AssertionError/ValueError/SystemExit from Megatron
                failures.append(f"{spec} ({resolved.backend}): {type(exc).__name__}: {exc}")
                continue
            checked += 1
            b = CARD.backend(resolved.backend)
            assert parsed.moe_token_dispatcher_type == b.dispatcher_type
            if b.flex_backend:
                assert config.moe_flex_dispatcher_backend == b.flex_backend
            assert parsed.expert_model_parallel_size == r.parallelism.ep
            assert parsed.num_experts == r.model.moe.num_experts
            assert parsed.data_parallel_size == r.data_parallel_size
            assert config.num_moe_experts == r.model.moe.num_experts
    assert not failures, "\n".join(failures)
    assert checked == 2 * len(SPECS)


def test_megatron_parser_rejects_a_bad_rendering(megatron_parser, monkeypatch):
    # The check can fail: EP that does not divide the experts, rendered past our own schema.
    margs, global_vars = megatron_parser
    r = recipes.load_recipe("tiny-cpu")
    args = recipes.render(r, availability=NONE)
    args[args.index("--num-experts") + 1] = "7"
    with pytest.raises(BaseException):
        _validate(margs, global_vars, monkeypatch, args, 2, {}, (9, 0))


def test_probe_flags_with_the_probe_parser_when_available(megatron_parser, monkeypatch):
    """If the probe's Megatron flags module exists, the full rendering (with probe flags) must parse too."""
    try:
        from megatron_moe_probe.megatron import flags  # built by another engineer
    except ImportError:
        pytest.skip("megatron_moe_probe.megatron.flags not available yet")
    provider = getattr(flags, "extra_args_provider", None) or getattr(flags, "add_probe_args", None)
    if provider is None:
        pytest.skip("flags module has no extra_args_provider/add_probe_args")
    margs, global_vars = megatron_parser
    r = recipes.load_recipe("tiny-cpu")
    args = recipes.render(r, availability=NONE, include_probe=True)
    parsed, _ = _validate(margs, global_vars, monkeypatch, args, 2, {}, (9, 0), extra_args_provider=provider)
    assert getattr(parsed, "moe_probe", None) is True


@pytest.mark.parametrize("spec", ["tiny-gpu:te", "tiny-gpu:te-graphs", "tiny-gpu:qwen3-layer-te"])
def test_production_path_variants_follow_the_transformer_engine_gate(spec):
    r = recipes.load_recipe(spec)
    with_te = recipes.render(r, availability=ALL_TE)
    assert arg_value(with_te, "--transformer-impl") == "transformer_engine"
    assert {"--moe-grouped-gemm", "--moe-router-fusion", "--moe-permute-fusion"} <= set(with_te)
    assert ("--cuda-graph-impl" in with_te) == ("graphs" in spec)
    without = recipes.resolve_dispatcher(r, NONE)
    args = recipes.render(r, availability=NONE, resolved=without)
    assert arg_value(args, "--transformer-impl") == "local"
    assert not {"--moe-grouped-gemm", "--moe-router-fusion", "--moe-permute-fusion", "--cuda-graph-impl"} & set(args)
    note = [n for n in without.notes if n.startswith("transformer implementation")]
    assert len(note) == 1 and "transformer_engine" in note[0] and "not rendered" in note[0]
