"""The launcher (`moe-probe train`) and `moe-probe build-dataset`, on CPU, with real Megatron code.

- build-dataset writes with Megatron's IndexedDatasetBuilder and is read back with its IndexedDataset;
- the launcher's arguments go through Megatron's own parse_and_validate_args (+ the probe's flags)
  and pretrain_cfg_container_from_args;
- one spawned gloo rank builds the launcher's GPTModel, a real MockGPTDataset and a real
  GPTDataset (.bin/.idx from build-dataset; index building through the compiled helpers that
  the compile_helpers quirk relies on), runs forward_step, and feeds its loss function through
  Megatron's own schedules.forward_step_calc_loss.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys

import pytest
import torch

from helpers import cli_in_process
from megatron_moe_probe import recipes
from megatron_moe_probe import torchrun
from megatron_moe_probe.megatron import data, launch, quirks

TINY_ARGS = (
    "--num-layers 2 --hidden-size 64 --ffn-hidden-size 128 --num-attention-heads 4 --seq-length 64 "
    "--max-position-embeddings 64 --micro-batch-size 2 --global-batch-size 2 --train-iters 4 --lr 1e-4 "
    "--num-experts 8 --moe-router-topk 2 --moe-ffn-hidden-size 128 --expert-model-parallel-size 1 "
    "--moe-token-dispatcher-type alltoall --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 1e-2 "
    "--transformer-impl local --no-gradient-accumulation-fusion --no-persist-layer-norm --no-masked-softmax-fusion "
    "--no-bias-dropout-fusion --no-bias-swiglu-fusion --no-rope-fusion --swiglu --disable-bias-linear "
    "--position-embedding-type rope --normalization RMSNorm --use-cpu-initialization --eval-iters 0 "
    "--hidden-dropout 0 --attention-dropout 0 --tokenizer-type NullTokenizer --vocab-size 257 "
    "--moe-probe --moe-probe-interval 2"
).split()


def cli(capsys, *argv):
    return cli_in_process(capsys, *argv)


def read_back(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return ds, [ds[i].tolist() for i in range(len(ds))]


# --- build-dataset ------------------------------------------------------------------------------

def test_build_dataset_reads_back_with_megatron(tmp_path, capsys):
    docs = [b"hello world\n", "gr\u00fc\u00dfe, \u4e16\u754c\n".encode(), b"\x00\x01 last"]
    src = tmp_path / "in"
    src.mkdir()
    for i, d in enumerate(docs):
        (src / f"{i}.txt").write_bytes(d)
    (src / ".hidden").write_bytes(b"skip me")
    rc, out, err = cli(capsys, "build-dataset", "--input", str(src), "--output-prefix", str(tmp_path / "c"),
                       "--append-eod", "--no-progress")
    assert rc == 0, err
    assert "3 documents" in out and "--tokenizer-type NullTokenizer --vocab-size 257" in out
    ds, got = read_back(tmp_path / "c")
    assert len(ds) == 3 and ds.document_indices.tolist() == [0, 1, 2, 3]
    assert got == [list(d) + [data.BYTE_EOD] for d in docs]
    assert ds.index.dtype == data.optimal_dtype(data.BYTE_VOCAB)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.bin", "c.idx", "in"]


def test_build_dataset_lines_and_jsonl(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("one\n\ntwo two\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "three"}) + "\n\n" + json.dumps({"text": "f\u00fcnf"}) + "\n")
    rc, _, err = cli(capsys, "build-dataset", "--input", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"),
                     "--output-prefix", str(tmp_path / "out"), "--split-lines", "--no-progress")
    assert rc == 0, err
    _, got = read_back(tmp_path / "out")
    assert got == [list(b"one"), list(b"two two"), list(b"three"), list("f\u00fcnf".encode())]


@pytest.mark.parametrize("case", ["empty-files", "missing", "bad-jsonl", "folder-is-a-file", "bad-tokenizer",
                                  "hf-no-dir"])
def test_build_dataset_errors_exit_2_and_leave_nothing(tmp_path, capsys, case):
    src = tmp_path / "in"
    src.mkdir()
    (src / "empty.txt").write_bytes(b"")
    (src / "blank.txt").write_bytes(b"\n\n")
    args = ["--input", str(src), "--split-lines"]
    prefix = tmp_path / "c"
    if case == "missing":
        args = ["--input", str(tmp_path / "nope.txt")]
    elif case == "bad-jsonl":
        (src / "x.jsonl").write_text('{"body": "no text key"}\n')
        args = ["--input", str(src / "x.jsonl")]
    elif case == "folder-is-a-file":  # a missing folder is created (issue 25); one that cannot be, refused
        (src / "ok.txt").write_text("text")
        (tmp_path / "a-file").write_text("x")
        prefix = tmp_path / "a-file" / "c"
    elif case == "bad-tokenizer":
        (src / "ok.txt").write_text("text")
        args += ["--tokenizer", "gpt5"]
    elif case == "hf-no-dir":
        (src / "ok.txt").write_text("text")
        args += ["--tokenizer", f"hf:{tmp_path / 'no-tokenizer'}"]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    rc, out, err = cli(capsys, "build-dataset", *args, "--output-prefix", str(prefix), "--no-progress")
    assert rc == 2, (out, err)
    assert "moe-probe build-dataset: error:" in err
    expected = {"empty-files": "every document was empty", "missing": "no such file", "bad-jsonl": "no 'text' field",
                "folder-is-a-file": "is a file", "bad-tokenizer": "unknown tokenizer",
                "hf-no-dir": "nothing is downloaded"}[case]
    assert expected in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no .bin/.idx, no temp folder


# --- quirks ------------------------------------------------------------------------------------

def test_compile_helpers_quirk_matches_the_wheel():
    from megatron.core.datasets import utils as ds_utils
    from megatron.training import initialize

    has_makefile, has_compiled, _ = quirks._helpers_state()
    assert has_compiled, "the 0.19 wheel ships helpers_cpp compiled"
    applied = quirks.apply()
    if has_makefile:  # a source checkout: nothing to work around
        assert "compile_helpers" not in applied
        return
    assert "compile_helpers" in applied
    assert ds_utils.compile_helpers() is None  # no `make`, no sys.exit(1)
    # initialize_megatron looks the function up at call time, so the module attribute is what it runs.
    import inspect

    assert "from megatron.core.datasets.utils import compile_helpers" in inspect.getsource(initialize._compile_dependencies)
    from megatron.core.datasets import helpers  # noqa: F401  (what GPTDataset index building imports)


# --- moe-probe train: the command line ---------------------------------------------------------

def test_train_dry_run_recipe_renders_torchrun(capsys):
    rc, out, err = cli(capsys, "train", "tiny-gpu", "--dry-run", "--assume-installed", "none", "--", "--train-iters", "5")
    assert rc == 0, err
    r = recipes.load_recipe("tiny-gpu")
    from megatron_moe_probe.selection.availability import assumed
    from megatron_moe_probe.selection.card import default_card

    rendered = recipes.render(r, availability=assumed(default_card(), set())) + recipes.probe_args(r)
    cmd = [line for line in out.splitlines() if "torch.distributed.run" in line and not line.startswith("#")]
    assert len(cmd) == 1
    assert "# torchrun" in out
    assert "-m torch.distributed.run --standalone --nnodes 1 --nproc-per-node 2 -m megatron_moe_probe.megatron.launch" in cmd[0]
    assert cmd[0].endswith(" ".join(rendered + ["--train-iters", "5"]))
    assert "--moe-probe --moe-probe-interval 10" in cmd[0]


def test_train_dry_run_variant_multinode_and_raw_args(capsys):
    rc, out, _ = cli(capsys, "train", "tiny-gpu", "--variant", "1gpu", "--dry-run", "--assume-installed", "none")
    assert rc == 0 and "--nproc-per-node 1" in out and "--expert-model-parallel-size 1" in out
    rc, out, _ = cli(capsys, "train", "tiny-gpu", "--dry-run", "--nnodes", "2", "--node-rank", "1",
                     "--master-addr", "node0", "--nproc-per-node", "8", "--assume-installed", "none")
    assert rc == 0
    assert "--nnodes 2 --node-rank 1 --master-addr node0 --master-port 29500 --nproc-per-node 8" in out
    assert "laid out for 2 GPU(s), launching 16" in out
    # Without an address a dry run prints one command per node with placeholders; a real run refuses.
    rc, out, _ = cli(capsys, "train", "tiny-gpu", "--dry-run", "--nnodes", "2", "--assume-installed", "none")
    assert rc == 0 and out.count('--master-addr "$MASTER_ADDR"') == 2
    assert "--node-rank 0 " in out and "--node-rank 1 " in out
    rc, _, err = cli(capsys, "train", "tiny-gpu", "--nnodes", "2", "--assume-installed", "none")
    assert rc == 2 and "--master-addr" in err
    rc, out, _ = cli(capsys, "train", "--dry-run", "--", *TINY_ARGS)
    assert rc == 0 and "--nproc-per-node 1" in out and out.rstrip().endswith(" ".join(TINY_ARGS))
    rc, _, err = cli(capsys, "train", "--dry-run")
    assert rc == 2 and "name a recipe" in err


def test_train_dispatcher_forces_one_ab_cell(capsys):
    # `train --dispatcher` is what every cell of recommend's A/B (`matrix --dispatcher`) runs.
    rc, out, err = cli(capsys, "train", "tiny-gpu", "--dispatcher", "allgather", "--dry-run", "--assume-installed", "none")
    assert rc == 0, err
    assert "--moe-token-dispatcher-type allgather" in out.splitlines()[-1]
    rc, _, err = cli(capsys, "train", "tiny-gpu", "--dispatcher", "flexx", "--dry-run")
    assert rc == 2 and "unknown dispatcher 'flexx'" in err
    rc, _, err = cli(capsys, "train", "--dispatcher", "alltoall", "--dry-run", "--", *TINY_ARGS)
    assert rc == 2 and "need a recipe" in err


def test_train_data_path_replaces_the_recipes_mock_data(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_bytes(b"some text")
    assert cli(capsys, "build-dataset", "--input", str(src), "--output-prefix", str(tmp_path / "t"),
               "--no-progress")[0] == 0
    rc, out, err = cli(capsys, "train", "tiny-gpu", "--data-path", str(tmp_path / "t"), "--dry-run",
                       "--assume-installed", "none")
    assert rc == 0, err
    cmd = out.splitlines()[-1].split()
    assert "--mock-data" not in cmd
    i = cmd.index("--data-path")
    assert cmd[i + 1:i + 4] == [str(tmp_path / "t"), "--split", "100,0,0"]
    # The model is the recipe's: its vocabulary (the byte tokens fit in it) and everything else.
    assert cmd[cmd.index("--vocab-size") + 1] == str(recipes.load_recipe("tiny-gpu").model.vocab_size)
    rc, _, err = cli(capsys, "train", "tiny-gpu", "--data-path", str(tmp_path / "missing"), "--dry-run")
    assert rc == 2 and "missing.bin" in err
    rc, _, err = cli(capsys, "train", "--data-path", str(tmp_path / "t"), "--dry-run", "--", *TINY_ARGS)
    assert rc == 2 and "need a recipe" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_train_without_cuda_exits_2_with_a_clear_message(capsys):
    rc, out, err = cli(capsys, "train", "tiny-gpu:1gpu", "--assume-installed", "none")
    assert rc == 2
    assert "pretrain() needs CUDA" in err and "moe-probe demo" in err and "--dry-run" in err
    assert launch.main(TINY_ARGS + ["--mock-data"]) == 2  # the torchrun worker entry says the same
    assert "pretrain() needs CUDA" in capsys.readouterr().err


# --- the launcher's arguments through Megatron's parser ----------------------------------------

def test_tiny_gpu_recipe_through_megatron_parser_and_config_container(monkeypatch):
    import megatron.training.arguments as margs
    from megatron.training import global_vars
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    plan = torchrun.plan_training("tiny-gpu", assume_installed="none")
    margv, env, world = plan.megatron_args, plan.env, plan.recipe_world
    assert world == 2
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    # Megatron's parser asks the GPU for its compute capability; answer H200's (the recipe's hardware).
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))
    monkeypatch.setattr(margs, "get_device_arch_version", lambda: 9)
    argv_before = list(sys.argv)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            args = launch.parse_megatron_args(margv)
            quirks.silence_model_provider_warning()
            cfg = pretrain_cfg_container_from_args(args)
    finally:
        global_vars.unset_global_variables()
    assert sys.argv == argv_before
    assert args.moe_probe and args.moe_probe_interval == 10 and args.moe_probe_timing
    assert args.moe_probe_writers == ["local", "console"] and args.moe_probe_gpus_per_node == 2
    assert (args.num_experts, args.moe_router_topk, args.expert_model_parallel_size) == (32, 4, 2)
    assert args.moe_token_dispatcher_type == "alltoall" and args.mock_data and args.transformer_impl == "local"
    assert args.data_parallel_size == 2 and args.padded_vocab_size >= 32000
    assert cfg.model is None  # the model comes from launch.model_provider
    assert cfg.train.train_iters == 40 and cfg.train.global_batch_size == 16


def test_unsupported_megatron_modes_are_refused(monkeypatch):
    import megatron.training.arguments as margs
    from megatron.training import global_vars

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))
    monkeypatch.setattr(margs, "get_device_arch_version", lambda: 9)
    try:
        with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit, match="--sft"):
            launch.parse_megatron_args(TINY_ARGS + ["--mock-data", "--sft"])
    finally:
        global_vars.unset_global_variables()


# --- model provider, datasets and forward_step on one CPU rank --------------------------------

def _rank_job(rank, world, prefix):
    """One gloo rank: parse args like main(), build the launcher's model and datasets, run forward_step."""
    import megatron.training.arguments as margs
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel.schedules import forward_step_calc_loss
    from megatron.core.tensor_parallel import random as mc_random
    from megatron.training import global_vars

    from megatron_moe_probe.cpu import compat as cpu_compat

    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
    margs.get_device_arch_version = lambda: 9
    cpu_compat.enable()
    applied = quirks.apply()
    results = {"quirks": applied}
    model = None
    for name, extra in (("mock", ["--mock-data"]), ("real", ["--data-path", prefix, "--split", "100,0,0"])):
        with contextlib.redirect_stdout(io.StringIO()):
            args = launch.parse_megatron_args(TINY_ARGS + extra)
        if model is None:
            parallel_state.initialize_model_parallel(create_gloo_process_groups=False)
            torch.manual_seed(1)
            mc_random.model_parallel_cuda_manual_seed(1)
            model = launch.model_provider(pre_process=True, post_process=True, config=None, pg_collection=None)
            results["model"] = (type(model).__name__, sum(1 for n, _ in model.named_modules() if n.endswith(".router")))
        train, valid, test = launch.train_valid_test_datasets_provider([6, 0, 0])
        sample = train[0]
        loader = iter(torch.utils.data.DataLoader(train, batch_size=args.micro_batch_size))
        output, loss_fn = launch.forward_step(loader, model)
        store: list = []
        scaled, num_tokens = forward_step_calc_loss(model, output, loss_fn, model.config, None, False, 2, store,
                                                    cp_group_size=1, is_last_stage=True)
        model.zero_grad(set_to_none=True)
        scaled.backward()
        results[name] = dict(
            dataset=type(train).__name__, length=len(train), splits=(valid is not None, test is not None),
            sample={k: (tuple(v.shape), str(v.dtype)) for k, v in sample.items()},
            max_token=int(sample["tokens"].max()), output=tuple(output.shape), num_tokens=int(num_tokens),
            report=store[0]["lm loss"].tolist(), scaled=float(scaled),
            router_grads=all(p.grad is not None for n, p in model.named_parameters() if ".router." in n),
        )
        global_vars.unset_global_variables()
    return results


def test_model_datasets_and_forward_step_on_cpu(tmp_path):
    from megatron_moe_probe.cpu.cluster import run_ranks

    # ~9 KB of text -> a few dozen 64-token samples: more than the 6 the provider is asked for.
    src = tmp_path / "text"
    src.mkdir()
    words = ["alpha", "beta", "router", "expert", "token", "gamma"]
    for i in range(20):
        (src / f"{i}.txt").write_text(" ".join(words[(i * j) % 6] for j in range(80)))
    data.build([str(src)], str(tmp_path / "corpus"), append_eod=True, progress=False)

    [res] = run_ranks(_rank_job, 1, str(tmp_path / "corpus"))
    assert ("compile_helpers" in res["quirks"]) == (not quirks._helpers_state()[0])
    assert res["model"] == ("GPTModel", 2)  # two MoE layers, one router each
    seq, mbs = 64, 2
    for name, dataset in (("mock", "MockGPTDataset"), ("real", "GPTDataset")):
        r = res[name]
        assert r["dataset"] == dataset and r["length"] >= 6
        assert r["sample"]["tokens"] == ((seq,), "torch.int64") and r["sample"]["labels"] == ((seq,), "torch.int64")
        assert r["sample"]["loss_mask"] == ((seq,), "torch.float32")
        assert r["sample"]["attention_mask"] == ((1, seq, seq), "torch.bool")
        assert r["output"] == (mbs, seq)  # per-token losses
        # 0.19 loss contract: (sum, num_tokens, {"lm loss": [sum, num_tokens]}); the schedule divides
        # the sum by num_tokens and by the 2 micro-batches.
        assert r["num_tokens"] == mbs * seq and r["report"][1] == mbs * seq
        assert r["scaled"] == pytest.approx(r["report"][0] / (mbs * seq) / 2, rel=1e-5)
        assert 4.0 < r["report"][0] / r["report"][1] < 8.0  # ~ln(384) for an untrained model
        assert r["router_grads"]
    assert res["real"]["splits"] == (False, False)  # --split 100,0,0: train only
    assert res["real"]["max_token"] <= data.BYTE_EOD  # byte ids + EOD, within NullTokenizer(257)
    assert res["real"]["length"] < 1000 < res["mock"]["length"]  # the real one is sized by the text
