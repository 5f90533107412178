"""The multi-node A/B plan on CPU: `train --dry-run` and `matrix --dry-run` for a 2-node recipe
(per-node commands with $NODE_RANK / $MASTER_ADDR, or the values given), and the Slurm scripts of
`render --format sbatch` and `matrix --sbatch`: bash -n, the srun line parsed, and the script run
under a stand-in srun/scontrol that prints what each rank would get."""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
from pathlib import Path

import helpers
from megatron_moe_probe.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))
RECIPE = "qwen3-30b-a3b"  # 2 nodes x 8 GPUs, EP 16


def cli(*argv, env=None) -> subprocess.CompletedProcess:
    return helpers.cli(*argv, env=env, timeout=300, cwd=ROOT)


def expand(line: str, **variables) -> list[str]:
    """The words bash makes of a printed command line with these variables set."""
    proc = subprocess.run(["bash", "-c", f'set -- {line}; printf "%s\\n" "$@"'], capture_output=True, text=True,
                          env={**os.environ, **variables}, check=True)
    return proc.stdout.splitlines()


run_cli = helpers.cli_in_process


def test_train_dry_run_prints_one_command_per_node(capsys):
    rc, stdout, err = run_cli(capsys, "train", RECIPE, "--assume-installed", "hybridep", "--dry-run")
    assert rc == 0, err
    lines = stdout.splitlines()
    assert "8 process(es) per node x 2 node(s)" in lines[0]
    commands = [l for l in lines if "torch.distributed.run" in l and not l.startswith("#")]
    assert len(commands) == 2 and any(l == "# node 1 of 2" for l in lines)
    for rank, line in enumerate(commands):
        words = expand(line, MASTER_ADDR="10.0.0.1")
        assert words[words.index("--nnodes") + 1] == "2" and words[words.index("--node-rank") + 1] == str(rank)
        assert words[words.index("--master-addr") + 1] == "10.0.0.1"  # "$MASTER_ADDR", expanded on the node
        assert words[words.index("--nproc-per-node") + 1] == "8"
    # given values: one command, no placeholder
    rc, stdout, err = run_cli(capsys, "train", RECIPE, "--assume-installed", "hybridep", "--dry-run", "--node-rank", "1",
                              "--master-addr", "h0")
    assert rc == 0, err
    (line,) = [l for l in stdout.splitlines() if "torch.distributed.run" in l and not l.startswith("#")]
    assert "--node-rank 1 --master-addr h0" in line and "$" not in line
    rc, _, err = run_cli(capsys, "train", RECIPE, "--assume-installed", "hybridep", "--dry-run", "--node-rank", "2",
                         "--master-addr", "h0")
    assert rc == 2 and "outside 0..1" in err


def test_matrix_dry_run_for_two_nodes(tmp_path, capsys):
    out = tmp_path / "ab"
    rc, stdout, err = run_cli(capsys, "matrix", RECIPE, "--dispatcher", "alltoall,hybridep", "--assume-installed",
                              "hybridep", "--iters", "5", "--out", str(out), "--dry-run")
    assert rc == 0, err
    assert "2 cell(s) validated, nothing trained" in stdout and "world size 16" in stdout
    cells = [l.split(" > ")[0] for l in stdout.splitlines() if " train " in l]
    assert len(cells) == 2 and all('--node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR"' in c for c in cells)
    # The printed cell command, on node 1, is a command `train` accepts: checked as its own dry run.
    words = expand(cells[1], NODE_RANK="1", MASTER_ADDR="h0")
    at = words.index("--")
    node_dry = subprocess.run([*words[:at], "--dry-run", *words[at:]], capture_output=True, text=True, env=ENV,
                              timeout=300, cwd=ROOT)
    assert node_dry.returncode == 0, node_dry.stderr
    assert "--node-rank 1 --master-addr h0" in node_dry.stdout and "--moe-flex-dispatcher-backend hybridep" in node_dry.stdout
    # with the values given, the cells carry them
    rc, stdout, _ = run_cli(capsys, "matrix", RECIPE, "--dispatcher", "alltoall", "--assume-installed", "hybridep",
                            "--out", str(out), "--node-rank", "0", "--master-addr", "h0", "--dry-run")
    assert rc == 0 and "--node-rank 0 --master-addr h0" in stdout
    # a real run without them stops before anything is written
    rc, _, err = run_cli(capsys, "matrix", RECIPE, "--dispatcher", "alltoall", "--assume-installed", "hybridep",
                         "--out", str(out))
    assert rc == 2 and "--node-rank and --master-addr" in err and not out.exists()


def srun_words(script: str) -> list[str]:
    """The srun command of a script, continuation lines joined, as shell words."""
    text = script.replace("\\\n", " ")
    (line,) = [l for l in text.splitlines() if l.startswith("srun ")]
    return shlex.split(line)


def fake_slurm(folder: Path) -> dict:
    """srun / scontrol stand-ins: scontrol lists two hosts; srun starts every task of the job in
    turn with Slurm's per-task variables set."""
    folder.mkdir()
    (folder / "scontrol").write_text("#!/bin/bash\nprintf 'node-a\\nnode-b\\n'\n")
    (folder / "srun").write_text("#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n"
                                 "for ((i = 0; i < SLURM_NTASKS; i++)); do\n"
                                 "  SLURM_PROCID=$i SLURM_LOCALID=$((i % 8)) \"$@\" || exit 1\ndone\n")
    (folder / "python").write_text("#!/bin/bash\necho \"RANK=$RANK LOCAL_RANK=$LOCAL_RANK WORLD_SIZE=$WORLD_SIZE "
                                   "MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT ARGS=$*\"\n")
    for name in ("scontrol", "srun", "python"):
        (folder / name).chmod(stat.S_IRWXU)
    return {**os.environ, "PATH": f"{folder}:{os.environ['PATH']}", "SLURM_NTASKS": "16",
            "SLURM_JOB_NODELIST": "node-[a-b]", "PYTHON": str(folder / "python")}


def check_script(path: Path, nodes: int, gpus: int, tmp_path: Path) -> list[str]:
    script = path.read_text()
    subprocess.run(["bash", "-n", str(path)], check=True)
    assert f"#SBATCH --nodes={nodes}\n" in script and f"#SBATCH --ntasks-per-node={gpus}\n" in script
    assert f"#SBATCH --gpus-per-node={gpus}\n" in script
    words = srun_words(script)
    assert f"--ntasks-per-node={gpus}" in words and f"--nodes={nodes}" in words
    wrapper = words[words.index("-c") + 1]
    assert 'RANK="$SLURM_PROCID"' in wrapper and 'LOCAL_RANK="$SLURM_LOCALID"' in wrapper
    command = words[words.index("moe-probe-rank") + 1:]
    assert command[:4] == ["${PYTHON:-python}", "-m", "megatron_moe_probe.cli", "train"]
    assert "--node-rank" not in command and "--master-addr" not in command  # srun gives every task its rank
    # Run it with stand-ins: 16 ranks, each with its own RANK and LOCAL_RANK and the shared rendezvous.
    env = fake_slurm(tmp_path / f"slurm-{path.stem}")
    ran = subprocess.run(["bash", str(path)], capture_output=True, text=True, env=env, timeout=60, check=True)
    ranks = [dict(re.findall(r"(\w+)=(\S*)", l.split(" ARGS=")[0])) for l in ran.stdout.splitlines()]
    assert [r["RANK"] for r in ranks] == [str(i) for i in range(16)]
    assert [r["LOCAL_RANK"] for r in ranks] == [str(i % 8) for i in range(16)]
    assert {r["WORLD_SIZE"] for r in ranks} == {"16"} and {r["MASTER_ADDR"] for r in ranks} == {"node-a"}
    assert {r["MASTER_PORT"] for r in ranks} == {"29500"}
    return command


def test_render_sbatch_for_a_recipe(tmp_path, capsys):
    path = tmp_path / "recipe.sbatch"
    assert cli_main(["render", RECIPE, "--format", "sbatch", "--assume-installed", "hybridep", "--out", str(path)]) == 0
    command = check_script(path, 2, 8, tmp_path)
    assert command[4:] == [RECIPE, "--assume-installed", "hybridep"]
    assert "# dispatcher: hybridep (measured winner" in path.read_text()


def test_matrix_sbatch_per_cell(tmp_path, capsys):
    folder, out = tmp_path / "sb", tmp_path / "ab"
    assert cli_main(["matrix", RECIPE, "--dispatcher", "alltoall,hybridep", "--assume-installed", "hybridep",
                     "--iters", "5", "--out", str(out), "--sbatch", str(folder), "--",
                     "--moe-router-force-load-balancing"]) == 0
    printed = capsys.readouterr().out
    assert "2 batch script(s)" in printed and not out.exists()
    for backend in ("alltoall", "hybridep"):
        command = check_script(folder / f"{RECIPE}-{backend}.sbatch", 2, 8, tmp_path)
        assert command[command.index("--dispatcher") + 1] == backend
        assert command[command.index("--moe-probe-dir") + 1] == str(out / f"{RECIPE}-{backend}")
        assert command[command.index("--train-iters") + 1] == "5" and "--moe-router-force-load-balancing" in command
    submit = (folder / "submit.sh").read_text()
    subprocess.run(["bash", "-n", str(folder / "submit.sh")], check=True)
    assert submit.count("sbatch --parsable") == 2 and "--dependency=afterany" in submit
