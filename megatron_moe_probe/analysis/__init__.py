"""Offline analysis of recorded routing: EP what-if, imbalance bands, expert placement and
replication, an all-to-all cost model with receiver skew, and two runs compared.

Everything here reads run folders through `megatron_moe_probe.record`, never a live
model, and works on token counts with the statistics of `stats.py`. One module per
concern; `run_analysis.py` puts them together, `commands/analyze.py` is `moe-probe analyze`.
The formulas and assumptions are in docs/analysis.md.
"""
