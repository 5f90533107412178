"""The main job (`moe-probe demo`) end to end, as the README runs it."""

import json

from helpers import cli
from megatron_moe_probe.cpu.cluster import TinyMoEConfig


def _demo(*argv):
    return cli("demo", *argv, timeout=600)


def test_demo_trains_and_writes_a_consistent_run(tmp_path):
    out = tmp_path / "run"
    proc = _demo("--steps", "6", "--interval", "3", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Routing imbalance per layer" in proc.stdout
    lines = (out / "intervals.jsonl").read_text().splitlines()
    reports = [json.loads(line) for line in lines]
    assert [r["step"] for r in reports] == [3, 6]
    cfg = TinyMoEConfig(micro_batch_size=4)
    per_step = 2 * cfg.micro_batch_size * cfg.seq_length * cfg.topk  # 2 ranks
    for r in reports:
        for counts, row in zip(r["tokens_per_expert"], r["per_layer"]):
            assert sum(counts) == per_step * r["steps"] == row["tokens"]
            # The matrix holds the same tokens, split by sender and receiver.
        for matrix, counts in zip(r["rank_matrix"], r["tokens_per_expert"]):
            assert sum(map(sum, matrix)) == sum(counts)
    assert (out / "imbalance.png").stat().st_size > 1000
    assert json.loads((out / "meta.json").read_text())
    # The exchange was checked on every counted forward: 2 ranks x 2 layers x 6 iterations.
    checked = 2 * 2 * 6
    assert f"dispatch integrity: clean ({checked} forwards count-checked, 0 payload-checked)" in proc.stdout


def test_demo_unwritable_output_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = _demo("--steps", "2", "--out", str(blocker / "sub"))
    assert proc.returncode == 2
    assert "cannot write the run folder" in proc.stderr
