"""The probe in a training loop (ProbeSession), its Megatron flags, and dispatcher timing, on CPU."""

import argparse
import math
import sys

import pytest

import megatron_jobs as jobs
from megatron_moe_probe.megatron import flags
from megatron_moe_probe.cpu.cluster import TinyMoEConfig, run_ranks
from megatron_moe_probe.record import load_run

BASE = TinyMoEConfig()


@pytest.mark.parametrize("timing", ["all", "forward"])
def test_session_reports_every_interval_and_the_rest_at_close(tmp_path, timing):
    steps, interval = 5, 2
    results = run_ranks(jobs.session_run, 2, BASE, str(tmp_path), steps, interval, timing,
                        1 if timing == "all" else 2)
    assert results[0]["flushed"] == [2, 4]
    _, reports = load_run(tmp_path)
    assert [r.step for r in reports] == [2, 4, 5]
    assert [r.steps for r in reports] == [2, 2, 1]
    tokens = BASE.micro_batch_size * BASE.seq_length * BASE.topk * 2  # per layer per step, both ranks
    # Timing samples one iteration in N (here N=1 for "all", 2 for "forward"), from each
    # interval's first: the record says N and how many iterations its times are the mean of.
    every = 1 if timing == "all" else 2
    assert [r.meta["timing_every"] for r in reports] == [every] * 3
    assert [r.meta["timing_sampled_iterations"] for r in reports] == ([2, 2, 1] if every == 1 else [1, 1, 1])
    for r in reports:
        assert r.layers == [1, 2]
        for row, counts in zip(r.per_layer, r.tokens_per_expert):
            assert sum(counts) == tokens * r.steps == row["tokens"]
            # Everything is on one node here (gpus_per_node=1 means each rank is its own node).
            assert row["inter_node_tokens"] + row["local_tokens"] == row["tokens"]
            # Timing: every phase measured (host clock on CPU), positive; "forward" times no backward.
            for phase in ("dispatch_fwd", "combine_fwd"):
                assert row[f"{phase}_ms"] > 0 and math.isfinite(row[f"{phase}_ms"]), phase
            for phase in ("dispatch_bwd", "combine_bwd"):
                if timing == "forward":
                    assert f"{phase}_ms" not in row, phase
                else:
                    assert row[f"{phase}_ms"] > 0 and math.isfinite(row[f"{phase}_ms"]), phase


def _parse(argv, provider=flags.add_probe_args):
    from megatron.training.arguments import parse_args

    saved = sys.argv
    sys.argv = ["pretrain_gpt.py", *argv]
    try:
        return parse_args(extra_args_provider=provider)
    finally:
        sys.argv = saved


def test_flags_through_megatrons_parser():
    args = _parse(["--moe-probe", "--moe-probe-interval", "5", "--moe-probe-writers", "local,console",
                   "--moe-probe-timing", "--log-interval", "7", "--moe-probe-gpus-per-node", "4"])
    settings = flags.resolve(args)
    assert settings.interval == 5 and settings.writers == ["local", "console"]
    # The flag alone times forward calls only, one iteration in 8 (backward: `all`).
    assert settings.timing == "forward" and settings.gpus_per_node == 4 and settings.history == 5
    assert settings.timing_every == 8
    assert flags.resolve(_parse(["--moe-probe", "--moe-probe-timing", "all"])).timing == "all"
    assert flags.resolve(_parse(["--moe-probe", "--moe-probe-timing", "--moe-probe-timing-every", "3"])).timing_every == 3
    # The history is capped the one way (settings.ProbeSettings.create) whatever builds the settings.
    assert flags.resolve(_parse(["--moe-probe", "--moe-probe-interval", "5000"])).history == 1000
    assert flags.resolve(_parse(["--moe-probe"])).timing is None
    # The payload fingerprint is off unless asked for; the count check is on (warn).
    plain = flags.resolve(_parse(["--moe-probe"]))
    assert (plain.integrity, plain.integrity_payload_every) == ("warn", 0)
    assert flags.resolve(_parse(["--moe-probe", "--moe-probe-integrity-payload-every", "4"])).integrity_payload_every == 4
    # Defaults: interval from --log-interval; tensorboard/wandb added when Megatron has them.
    args = _parse(["--moe-probe", "--log-interval", "7", "--tensorboard-dir", "/tmp/tb", "--save", "/tmp/ck"])
    settings = flags.resolve(args)
    assert settings.interval == 7
    assert settings.writers == ["local", "tensorboard"]
    assert settings.out_dir == "/tmp/ck/moe_probe"


@pytest.mark.parametrize("argv, message", [
    (["--moe-probe-writers", "local,slack"], "unknown writer 'slack'"),
    (["--moe-probe-interval", "0"], "expected a positive integer"),
    (["--moe-probe-interval", "ten"], "expected a positive integer"),
    (["--moe-probe-timing", "backward"], "invalid choice: 'backward'"),
    (["--moe-probe-integrity-payload-every", "-1"], "expected 0 or a positive integer"),
])
def test_bad_flag_values_are_one_clear_parser_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        _parse(["--moe-probe", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "--moe-probe" in err


def test_chain_args_keeps_the_users_own_flags():
    def mine(parser):
        parser.add_argument("--my-flag", type=int, default=3)
        return parser

    args = _parse(["--my-flag", "9", "--moe-probe"], provider=flags.chain_args(mine))
    assert args.my_flag == 9 and args.moe_probe
    # Chaining twice does not add the flags twice (argparse would raise on a duplicate).
    parser = flags.add_probe_args(flags.add_probe_args(argparse.ArgumentParser()))
    assert parser.parse_args(["--moe-probe"]).moe_probe


def test_unmodified_script_parser_gets_the_flags():
    from megatron.training import arguments

    from megatron_moe_probe.megatron import training

    original = arguments.parse_args
    try:
        training.add_flags_to_megatron_parser()
        saved = sys.argv
        sys.argv = ["pretrain_gpt.py", "--moe-probe", "--moe-probe-interval", "3"]
        try:
            args = arguments.parse_args()  # what an unmodified script calls, without our provider
        finally:
            sys.argv = saved
        assert args.moe_probe and args.moe_probe_interval == 3
    finally:
        arguments.parse_args = original


def test_install_wraps_and_uninstall_restores_megatron_training():
    from megatron.training import training as mt

    from megatron_moe_probe.megatron import training

    before = (mt.train_step, mt.save_checkpoint_and_time, mt.train)
    training.install()
    training.install()  # idempotent
    try:
        assert mt.train_step is not before[0] and mt.train_step.__wrapped__ is before[0]
        assert mt.save_checkpoint_and_time.__wrapped__ is before[1] and mt.train.__wrapped__ is before[2]
    finally:
        training.uninstall()
    assert (mt.train_step, mt.save_checkpoint_and_time, mt.train) == before


def test_probe_flags_without_the_switch_are_named():
    args = _parse(["--moe-probe-timing", "--moe-probe-interval", "4"])
    assert flags.flags_without_probe(args) == ["--moe-probe-interval", "--moe-probe-timing"]
    assert flags.flags_without_probe(_parse(["--moe-probe", "--moe-probe-timing"])) == []
    assert flags.flags_without_probe(_parse([])) == []


def test_recipe_timing_forward_renders_a_flag_megatron_parses():
    from megatron_moe_probe import recipes

    r = recipes.load_recipe("tiny-gpu")
    r = r.model_copy(update={"probe": r.probe.model_copy(update={"timing": "forward"})})
    rendered = recipes.probe_args(r)
    assert rendered[rendered.index("--moe-probe-timing") + 1] == "forward"
    assert flags.resolve(_parse(rendered)).timing == "forward"
    with pytest.raises(Exception, match="timing"):
        recipes.load_recipe_data({**recipes.load_recipe("tiny-gpu").model_dump(exclude={"variant"}),
                                  "probe": {"timing": "backward"}}, "test")
