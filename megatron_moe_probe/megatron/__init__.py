"""Everything that knows Megatron-Core internals lives in this subpackage."""
