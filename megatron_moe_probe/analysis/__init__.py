"""Offline analysis of recorded routing: EP what-if, imbalance bands, expert placement and
replication, an all-to-all cost model with receiver skew, and two runs compared.

Everything here reads run folders from the local store (`writers/local.py`), never a
live model, and works on token counts with the statistics of `stats.py`. One module per
concern; `cli.py` is `moe-probe analyze`. The formulas and assumptions are in
docs/analysis.md.
"""
