"""Shared parts of the real-data checks (``ph2_cpu.py``, ``la_cpu.py``): their options, the workspace,
and running ``semidiff benchmark`` on the derived CPU plans.

The scripts run as ``python benchmarks/NAME.py`` (this folder is then on ``sys.path``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def parse_args(doc: str, methods: str, labeled: str, epochs: int, iters_per_epoch: int, val_iters: int,
               set_example: str, extra: Callable[[argparse.ArgumentParser], None] | None = None
               ) -> argparse.Namespace:
    """The shared options; ``extra`` adds a script's own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=methods)
    p.add_argument("--labeled", default=labeled)
    p.add_argument("--seeds", default="0")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--iters-per-epoch", type=int, default=iters_per_epoch)
    p.add_argument("--val-iters", type=int, default=val_iters)
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", default=None)
    p.add_argument("--set", action="append", default=[], metavar="METHOD:KEY=VALUE",
                   help=f"a hyperparameter of one method, e.g. {set_example} (repeatable)")
    p.add_argument("--plan-only", action="store_true", help="convert, plan and preprocess, then stop")
    p.add_argument("--from-checkpoint", default=None, metavar="auto|PATH",
                   help="the two-stage protocol of `semidiff benchmark --from-checkpoint` (auto: supervised first)")
    p.add_argument("--first-epochs", type=int, default=None, help="with --from-checkpoint auto: the first stage's epochs")
    if extra:
        extra(p)
    return p.parse_args()


def workspace(subset: str, home: str) -> str:
    """``$SEMIDIFF_TEST_DATA/<subset>`` (exits with one sentence when the variable is unset); sets the
    default workspace and disables ``torch.compile``."""
    data = os.environ.get("SEMIDIFF_TEST_DATA")
    if not data:
        raise SystemExit(f"Set SEMIDIFF_TEST_DATA to the folder holding {subset}/.")
    os.environ.setdefault("SEMIDIFF_HOME", os.path.join(tempfile.gettempdir(), home))
    os.environ["nnUNet_compile"] = "false"
    return os.path.join(data, subset)


def run(args: argparse.Namespace, name: str, configuration: str, plans: str) -> dict:
    """``semidiff benchmark`` of ``args.methods`` on ``plans``; prints its table and wall time."""
    from semidiff_nnunet.api import benchmark_runs as bench

    methods = bench.parse_list(args.methods, "--methods")
    per_method: dict[str, dict[str, str]] = {}
    for item in args.set:
        method, _, kv = item.partition(":")
        key, _, value = kv.partition("=")
        if not key or not value or method not in methods:
            raise SystemExit(f"--set {item!r}: write METHOD:KEY=VALUE for one of {', '.join(methods)}.")
        per_method.setdefault(method, {})[key] = value
    t0 = time.time()
    result = bench.run_benchmark(name, methods, bench.parse_list(args.labeled, "--labeled"),
                                 [int(s) for s in bench.parse_list(args.seeds, "--seeds")], configuration, 0,
                                 args.device, plans, args.epochs, args.iters_per_epoch, per_method or None,
                                 Path(args.output) if args.output else None, show_progress=False,
                                 val_iters_per_epoch=args.val_iters, from_checkpoint=args.from_checkpoint,
                                 first_epochs=args.first_epochs)
    print(result["markdown"])
    print(f"benchmark wall time: {time.time() - t0:.0f} s; output in {result['output']}")
    return result
