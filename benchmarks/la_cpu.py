"""Real-data check in 3D on the Left Atrium subset (UA-MT's h5 form, 10 volumes) on a CPU.

Converts ``$SEMIDIFF_TEST_DATA/la_uamt`` with the ``la2018`` converter (UA-MT's train.list / test.list:
8 training volumes, 2 test volumes with labels, which are the held-out cases), plans it with nnU-Net's
3d_fullres, then derives CPU plans (``laCPUPlans``: target spacing 2.5 mm, so the volumes are about
22 × 36 × 46 voxels (median), patch 24 × 40 × 48, features <= 32, batch 2; preprocessed under its own data
identifier) and runs ``semidiff benchmark`` with every method at one labeled count and the same
iteration budget. With 8 training volumes, fold 0 trains on 6 or 7: ``--labeled 2`` keeps two labeled
(UA-MT's 10 % setting has 8 of 80).

    OMP_WAIT_POLICY=PASSIVE SEMIDIFF_TEST_DATA=../shared/data python benchmarks/la_cpu.py \\
        --methods supervised,mean-teacher,bcp --labeled 2 --seeds 0,1 --epochs 8 --iters-per-epoch 25
"""

from __future__ import annotations

import json
import time
from pathlib import Path

if __name__ == "__main__":
    from _real_data import parse_args, run, workspace

    args = parse_args(__doc__, "supervised,mean-teacher", "2", 4, 25, 3, "bcp:alpha=0.5")
    source = workspace("la_uamt", "semidiff_la")

    from semidiff_nnunet import api, paths, planning
    from semidiff_nnunet.dataset_conversion.api import convert_dataset

    paths.ensure_nnunet_env()
    name = "Dataset513_LA"
    if not (paths.raw_root() / name).is_dir():
        convert_dataset("la2018", Path(source), dataset_id=513, dataset_name="LA")
    t0 = time.time()
    api.plan_and_preprocess(name, ["3d_fullres"], fingerprint_voxels=2e6, show_progress=False)
    plans = planning.load_plans(name, "nnUNetPlans")
    cpu = "laCPUPlans"
    if not (planning.preprocessed_folder(name) / f"{cpu}.json").is_file():
        c = plans["configurations"]["3d_fullres"]
        c["spacing"] = [2.5, 2.5, 2.5]
        c["patch_size"] = [24, 40, 48]
        c["median_image_size_in_voxels"] = [22.0, 36.0, 46.0]
        c["batch_size"] = 2
        c["data_identifier"] = f"{cpu}_3d_fullres"
        kw = c["architecture"]["arch_kwargs"]
        n = 4  # 24 / 8 along the first axis: three poolings there, all four stages in-plane
        kw["n_stages"] = n
        kw["features_per_stage"] = [min(16 * 2 ** i, 32) for i in range(n)]
        kw["kernel_sizes"] = [[3, 3, 3]] * n
        kw["strides"] = [[1, 1, 1]] + [[2, 2, 2]] * (n - 1)
        kw["n_conv_per_stage"] = [2] * n
        kw["n_conv_per_stage_decoder"] = [2] * (n - 1)
        plans["configurations"] = {"3d_fullres": c}
        plans["plans_name"] = cpu
        (planning.preprocessed_folder(name) / f"{cpu}.json").write_text(json.dumps(plans, indent=2), encoding="utf-8")
        planning.preprocess(name, cpu, ["3d_fullres"], num_processes=2)
        c = planning.load_plans(name, cpu)["configurations"]["3d_fullres"]
    print(f"planning and preprocessing: {time.time() - t0:.0f} s")
    if args.plan_only:
        raise SystemExit(0)
    run(args, name, "3d_fullres", cpu)
