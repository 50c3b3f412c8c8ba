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
