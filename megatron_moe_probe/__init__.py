"""megatron_moe_probe: routing and token-dispatch telemetry for Megatron-Core MoE training.

Heavy imports (torch, Megatron) are deferred to the modules that need them, so
`moe-probe --help` and the recipe/selection tools start quickly.
"""

__version__ = "0.1.0"
