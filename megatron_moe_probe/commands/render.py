"""`moe-probe render NAME[:VARIANT]`: a recipe as Megatron-LM arguments and Megatron-Bridge
overrides. With `--out FILE` it writes only after everything validated (atomically)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_moe_probe.errors import UsageError
from megatron_moe_probe.recipes import all_recipe_specs, load_recipe, render_document
from megatron_moe_probe.record import atomic_write_text
from megatron_moe_probe.selection.availability import availability_for
from megatron_moe_probe.selection.card import default_card


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", help="NAME, NAME:VARIANT or a path to a recipe .yaml")
    p.add_argument("--list", action="store_true", help="list recipes and their variants")
    p.add_argument("--format", choices=["megatron", "bridge", "both", "json", "sbatch"], default="megatron",
                   help="sbatch: a Slurm batch script that trains the recipe on its nodes (srun, one task per GPU)")
    p.add_argument("--no-probe", action="store_true", help="leave out the probe's --moe-probe* flags")
    p.add_argument("--assume-installed", default=None, metavar="LIST",
                   help="resolve `auto` for another container: comma list (deepep,hybridep,ncclep,permute-fusion), 'all' or 'none'; default: probe this machine")
    p.add_argument("--out", default=None, help="write here instead of stdout (written only when everything validated)")


def run(args: argparse.Namespace) -> int:
    if args.list:
        for spec in all_recipe_specs():
            print(spec)
        return 0
    if not args.recipe:
        raise UsageError("name a recipe (moe-probe render --list shows them)")
    card = default_card()
    availability = availability_for(card, args.assume_installed)
    r = load_recipe(args.recipe)
    if args.format == "sbatch":
        from megatron_moe_probe.sbatch import recipe_script

        if args.no_probe:
            raise UsageError("--format sbatch trains through `moe-probe train`; leave the probe on (or edit the script)")
        text = recipe_script(args.recipe, assume_installed=args.assume_installed)
    else:
        text = render_document(r, availability, args.format, include_probe=not args.no_probe)
    if args.out:
        out = Path(args.out)
        if not out.parent.is_dir():
            raise UsageError(f"--out: directory {out.parent} does not exist")
        atomic_write_text(out, text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
