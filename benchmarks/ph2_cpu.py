"""Real-data check on the PH2 subset (60 dermoscopy cases) on a CPU: supervised vs the SSL baselines.

Converts ``$SEMIDIFF_TEST_DATA/ph2`` with the ``ph2`` converter, plans it with nnU-Net, then
derives CPU plans (``ph2CPUPlans``: target spacing 4 px so images are about 191x143, patch
128x160, features <= 32, batch 4; preprocessed under its own data identifier) and runs
``semidiff benchmark`` with every method at one labeled fraction and the same iteration budget.
Held out: the validation cases of fold 0 (the subset has no test split).

    OMP_WAIT_POLICY=PASSIVE SEMIDIFF_TEST_DATA=../shared/data python benchmarks/ph2_cpu.py \\
        --methods supervised,mean-teacher,uamt,cps,fixmatch,urpc,cct,entropy-min --labeled 0.1 --epochs 4
"""

from __future__ import annotations

import json
import time
from pathlib import Path

if __name__ == "__main__":
    from _real_data import parse_args, run, workspace

    args = parse_args(__doc__, "supervised,mean-teacher,uamt,cps,fixmatch,urpc,cct,entropy-min", "0.1", 4, 40, 5,
                      "diffrect:refine_start=0.25")
    source = workspace("ph2", "semidiff_ph2")

    from semidiff_nnunet import api, paths, planning
    from semidiff_nnunet.dataset_conversion.api import convert_dataset

    paths.ensure_nnunet_env()
    name = "Dataset512_PH2"
    if not (paths.raw_root() / name).is_dir():
        convert_dataset("ph2", Path(source), dataset_id=512)
    t0 = time.time()
    api.plan_and_preprocess(name, ["2d"], fingerprint_voxels=1e6, show_progress=False)
    plans = planning.load_plans(name, "nnUNetPlans")
    cpu = "ph2CPUPlans"
    if not (planning.preprocessed_folder(name) / f"{cpu}.json").is_file():
        c = plans["configurations"]["2d"]
        c["spacing"] = [4.0, 4.0]
        c["patch_size"] = [128, 160]
        c["batch_size"] = 4
        c["data_identifier"] = f"{cpu}_2d"
        c["median_image_size_in_voxels"] = [143.0, 191.0]
        kw = c["architecture"]["arch_kwargs"]
        n = 6  # 128/32: five poolings
        kw["n_stages"] = n
        kw["features_per_stage"] = [min(32 * 2 ** i, 32) for i in range(n)]
        kw["kernel_sizes"] = [[3, 3]] * n
        kw["strides"] = [[1, 1]] + [[2, 2]] * (n - 1)
        kw["n_conv_per_stage"] = [2] * n
        kw["n_conv_per_stage_decoder"] = [2] * (n - 1)
        plans["configurations"] = {"2d": c}
        plans["plans_name"] = cpu
        (planning.preprocessed_folder(name) / f"{cpu}.json").write_text(json.dumps(plans, indent=2), encoding="utf-8")
        planning.preprocess(name, cpu, ["2d"], num_processes=2)
    print(f"planning and preprocessing: {time.time() - t0:.0f} s")
    if args.plan_only:
        raise SystemExit(0)
    run(args, name, "2d", cpu)
