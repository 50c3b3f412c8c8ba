"""Reading a sub-module's output during a forward pass (shared by the methods that need features)."""

from __future__ import annotations

import contextlib

from torch import nn


@contextlib.contextmanager
def captured_output(module: nn.Module):
    """``with captured_output(net.decoder.stages[-1]) as store: net(x)`` → ``store["out"]`` is that
    module's output of the last call inside the block (the hook is removed on exit)."""
    store: dict = {}
    handle = module.register_forward_hook(lambda _m, _i, out: store.__setitem__("out", out))
    try:
        yield store
    finally:
        handle.remove()


@contextlib.contextmanager
def replaced_output(module: nn.Module, fn):
    """``with replaced_output(net.encoder, f): net(x)`` → inside the block, whatever ``module`` returns
    is replaced by ``f(output)`` before the rest of the network reads it (e.g. UniMatch's feature
    perturbation of the encoder's skips); the hook is removed on exit, so inference never sees it."""
    handle = module.register_forward_hook(lambda _m, _i, out: fn(out))
    try:
        yield
    finally:
        handle.remove()
