"""Wrapping one method of one Megatron object (an instance attribute over the class's method).

The live side observes Megatron by wrapping methods of its routers and dispatchers rather than
registering module hooks where it can: Megatron's local CUDA graphs (`--cuda-graph-impl local`)
refuse to run a graphed layer whose submodules carry user forward pre-hooks. Several wrappers
may stack on one method (the counting hooks, the integrity check, router health, timing); each
is removed on its own, in any order: one on top is taken off, one underneath passes through.
"""

from __future__ import annotations

from typing import Callable


class MethodWrap:
    """`obj.name` replaced by `make(original)`; `remove()` undoes it."""

    def __init__(self, obj, name: str, make: Callable[[Callable], Callable]):
        self.obj, self.name = obj, name
        self._had_own = name in obj.__dict__  # another wrapper (or a plain attribute) underneath
        self._previous = obj.__dict__.get(name)
        original = getattr(obj, name)
        inner = make(original)
        self.passthrough = False

        def wrapper(*args, **kwargs):
            if self.passthrough:
                return original(*args, **kwargs)
            return inner(*args, **kwargs)

        wrapper._method_wrap = self
        self.wrapper = wrapper
        obj.__dict__[name] = wrapper

    def remove(self) -> None:
        if self.obj.__dict__.get(self.name) is not self.wrapper:
            self.passthrough = True  # another wrapper sits on top and calls ours: ours passes through
            return
        had_own, previous = self._had_own, self._previous
        below = getattr(previous, "_method_wrap", None)
        while had_own and below is not None and below.passthrough:  # skip wrappers removed earlier
            had_own, previous = below._had_own, below._previous
            below = getattr(previous, "_method_wrap", None)
        if had_own:
            self.obj.__dict__[self.name] = previous
        else:
            del self.obj.__dict__[self.name]
