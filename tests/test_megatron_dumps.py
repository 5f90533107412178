"""Megatron's own routing dumps as run sources: RouterTracer and the tokens-per-expert logger,
both run by Megatron's own code on the CPU Megatron MoE, checked against the dispatcher."""

import json
import shutil

import pytest
import torch

import dump_jobs
from megatron_moe_probe import cli, stats
from megatron_moe_probe.cpu.cluster import TinyMoEConfig, run_ranks
from megatron_moe_probe import megatron_dumps
from megatron_moe_probe.record import load_run

CFG = TinyMoEConfig()
WORLD, STEPS, MICRO, EVAL_EVERY, TPE_EVERY = 2, 6, 2, 2, 2


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    root = tmp_path_factory.mktemp("dumps")
    trace, save = root / "trace", root / "save"
    results = run_ranks(dump_jobs.megatron_dumps, WORLD, CFG, str(trace), str(save), STEPS, MICRO, EVAL_EVERY,
                        TPE_EVERY)
    return {"trace": trace, "tpe": save / "tokens_per_expert", "save": save, "results": results}


def _truth_counts(results, iterations, layer):
    """Global [E] counts over the given 1-based iterations, from each rank's dispatcher."""
    out = []
    for r in sorted(results, key=lambda r: r["ep_rank"]):  # EP rank r holds experts [r*E/EP, (r+1)*E/EP)
        local = len(r["truth"][0][layer]["per_local_expert"])
        out += [sum(r["truth"][it - 1][layer]["per_local_expert"][j] for it in iterations) for j in range(local)]
    return out


def _import(tmp_path, dump, *extra):
    out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
    assert cli.main(["import", str(dump), "--out", str(out), *extra]) == 0
    return load_run(out)


def test_router_trace_counts_match_the_dispatcher(dumps, tmp_path):
    meta, reports = _import(tmp_path, dumps["trace"], "--interval", "2")
    tokens = CFG.micro_batch_size * CFG.seq_length * MICRO * WORLD  # routed per step, all ranks
    assert [r.step for r in reports] == [2, 4, 6] and all(r.steps == 2 for r in reports)
    assert meta["imported"]["ep"] == WORLD and meta["imported"]["rank_matrix"] == "measured"
    # Evaluation forwards ran after iterations 2 and 4; RouterTracer folded them into 3 and 5.
    evals = len(range(EVAL_EVERY, STEPS, EVAL_EVERY))
    assert meta["imported"]["dropped_records"] == {"evaluation folded into the next step": evals * WORLD * 2}
    for r in reports:
        its = range(r.step - r.steps + 1, r.step + 1)
        assert r.layers == [1, 2] and r.num_experts == CFG.num_experts and r.meta["topk"] == CFG.topk
        for i, layer in enumerate(r.layers):
            assert sum(r.tokens_per_expert[i]) == r.steps * tokens * CFG.topk == r.per_layer[i]["tokens"]
            assert r.tokens_per_expert[i] == _truth_counts(dumps["results"], its, layer)
            # Row s of the matrix: what EP rank s sent to each rank (the alltoall's input_splits).
            for res in dumps["results"]:
                sent = [sum(res["truth"][it - 1][layer]["input_splits"][d] for it in its) for d in range(WORLD)]
                assert r.rank_matrix[i][res["ep_rank"]] == sent


@pytest.mark.parametrize("ep", [1, 4, 8])
def test_router_trace_rank_matrix_at_other_ep(dumps, tmp_path, ep):
    _, reports = _import(tmp_path, dumps["trace"], "--ep", str(ep), "--interval", "3")
    tokens = CFG.micro_batch_size * CFG.seq_length * MICRO * WORLD
    for r in reports:
        assert r.ep_size == ep
        for i in range(len(r.layers)):
            m = torch.tensor(r.rank_matrix[i])
            counts = torch.tensor(r.tokens_per_expert[i])
            assert m.shape == (ep, ep)
            assert m.sum(0).tolist() == stats.per_rank_load(counts, ep).tolist()  # received = experts' load
            assert m.sum(1).tolist() == [r.steps * tokens * CFG.topk // ep] * ep  # each source its share


def test_tokens_per_expert_dump_from_save_tpe(dumps, tmp_path):
    files = sorted(p.name for p in dumps["tpe"].iterdir())
    assert files == ["rank0.jsonl", "rank1.jsonl"]
    meta, reports = _import(tmp_path, dumps["save"], "--topk", str(CFG.topk))  # the --save folder works too
    sampled = list(range(TPE_EVERY, STEPS + 1, TPE_EVERY))
    assert [r.step for r in reports] == sampled and all(r.steps == 1 for r in reports)
    assert meta["imported"]["rank_matrix"] == "absent" and all(r.rank_matrix == [] for r in reports)
    tokens = CFG.micro_batch_size * CFG.seq_length * MICRO * WORLD
    for r in reports:
        for i, layer in enumerate(r.layers):
            assert r.tokens_per_expert[i] == _truth_counts(dumps["results"], [r.step], layer)
            assert sum(r.tokens_per_expert[i]) == tokens * CFG.topk


@pytest.mark.parametrize("which", ["trace", "tpe"])
def test_analyze_and_compare_take_dump_folders(dumps, which, capsys):
    assert cli.main(["analyze", str(dumps[which]), "--json", "--hidden-size", str(CFG.hidden_size),
                     "--ep", "2,4,8"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [row["ep"] for row in result["ep_whatif"]["by_ep"]] == [2, 4, 8]
    assert result["placement"]["layers"] and result["bands"]
    if which == "trace":
        assert "skipped" not in result["matrix_check"] and "skipped" not in result["cost"]
        assert result["cost"]["settings"]["tokens_per_rank"]["value"] == CFG.micro_batch_size * CFG.seq_length
        assert any(e["source"] == "measured" for e in result["cost"]["by_ep"])
    else:
        assert "skipped" in result["matrix_check"]
        assert all(e["source"] == "modelled" for e in result["cost"].get("by_ep", []))
    assert cli.main(["compare", str(dumps[which]), "--json", "--warmup", "0"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["ep"] == WORLD and rows[0]["max_over_mean"] >= 1


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _error(capsys, *argv):
    assert cli.main(list(argv)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


def test_truncated_and_mixed_dumps_are_refused(dumps, tmp_path, capsys):
    out = str(tmp_path / "out")
    cut = _copy(dumps["trace"], tmp_path / "cut")
    f = cut / "router_trace_rank1.jsonl"
    text = f.read_text()
    f.write_text(text[: len(text) - 500])  # killed while writing the last record
    assert "cut short" in _error(capsys, "import", str(cut), "--out", out)
    # --drop-incomplete keeps only the steps every rank has.
    meta, reports = _import(tmp_path, cut, "--drop-incomplete", "--interval", "1")
    assert [r.step for r in reports] == list(range(1, STEPS))

    short = _copy(dumps["trace"], tmp_path / "short")
    f = short / "router_trace_rank0.jsonl"
    f.write_text("".join(line for line in f.read_text().splitlines(True) if json.loads(line)["step"] != 5))
    assert "truncated or mixed dump" in _error(capsys, "import", str(short), "--out", out)

    mixed = _copy(dumps["trace"], tmp_path / "mixed")
    shutil.copy(dumps["tpe"] / "rank0.jsonl", mixed / "rank0.jsonl")
    assert "mixed dump" in _error(capsys, "analyze", str(mixed))

    swapped = _copy(dumps["trace"], tmp_path / "swapped")
    (swapped / "router_trace_rank0.jsonl").write_text((dumps["trace"] / "router_trace_rank1.jsonl").read_text())
    assert "a record of rank 1 in rank 0's file" in _error(capsys, "import", str(swapped), "--out", out)

    twice = _copy(dumps["tpe"], tmp_path / "twice")
    for name in ("rank0.jsonl", "rank1.jsonl"):  # save_tpe appends: a second run into the same --save
        (twice / name).write_text((dumps["tpe"] / name).read_text() * 2)
    assert "two runs appended" in _error(capsys, "import", str(twice), "--out", out)

    gap = _copy(dumps["trace"], tmp_path / "gap")
    (gap / "router_trace_rank1.jsonl").unlink()
    shutil.copy(dumps["trace"] / "router_trace_rank0.jsonl", gap / "router_trace_rank2.jsonl")
    assert "not consecutive" in _error(capsys, "import", str(gap), "--out", out)
    assert megatron_dumps.detect(tmp_path / "out") is None
