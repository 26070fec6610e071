"""Accuracy cost of gradient compression: 4 gloo ranks as 2 nodes x 2, same model, seeds and epochs (issue 3).

Datasets: scikit-learn's 8x8 digits (models/data.py) and MNIST-1D (the `mnist1d` package generates it offline;
signals of 40 values as (1, 1, 40) images; it needs many epochs, so differences between methods show).
Model: the `small` CNN preset (`--quick`: `tiny`); 15 epochs on digits, 12 on MNIST-1D by default (what a shared
2-core machine finishes in ~10 minutes; one seed, so differences of a point are within run-to-run noise).
Methods: exact allreduce (DDP default), hierarchical 2-bit with error feedback (collectives/hook.py, TwoBitEF),
torch's PowerSGD hook (rank 4, futures waited for gloo), torch's fp16_compress_hook.
SGD with momentum, identical data order on every method.

Keys per dataset: acc_exact, acc_2bit, acc_powersgd, acc_fp16 (test accuracy after the last epoch),
acc_delta_pts (2-bit minus exact, points; goal >= -0.3), epochs_to_target per method (first epoch reaching the
exact run's final accuracy minus 1 point; None if never), so time to accuracy over a slow link is epochs x steps
per epoch x the slow-link step time. Top-level acc_delta_pts is the worse of the two datasets.
Writes bench/results/compression_accuracy.json (not with --quick).
"""

import argparse
import datetime
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

METHODS = ("exact", "2bit", "powersgd", "fp16")
TARGET_MARGIN = 0.01  # epochs_to_target: exact's final accuracy minus 1 point


def load(name: str, workdir: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test) as (N, 1, H, W) float32 and int64."""
    if name == "digits":
        from models.data import load_tensors, validate_parquet, write_digits

        train, test = write_digits(workdir)
        _, xtr, ytr = load_tensors(validate_parquet(train))
        _, xte, yte = load_tensors(validate_parquet(test))
        return xtr, ytr.long(), xte, yte.long()
    from mnist1d.data import get_dataset_args, make_dataset

    d = make_dataset(get_dataset_args())  # seed 42, 4000 train / 1000 test, offline

    def to(x):
        x = torch.as_tensor(x, dtype=torch.float32)
        return ((x - x.mean()) / x.std()).view(len(x), 1, 1, -1)

    return to(d["x"]), torch.as_tensor(d["y"]).long(), to(d["x_test"]), torch.as_tensor(d["y_test"]).long()


def _powersgd_waited(state, bucket):
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

    fut = torch.futures.Future()
    fut.set_result(powerSGD_hook.powerSGD_hook(state, bucket).wait())
    return fut


def _attach(ddp: DDP, method: str) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    from collectives.hook import HookConfig, register
    from collectives.internode import TwoBitEF

    if method == "2bit":
        # The reference codec: bit-identical to the compiled one, and no compile in each of the 4 ranks.
        register(ddp, HookConfig(codec=TwoBitEF(compiled=False), warmup_steps=0, ranks_per_node=2))
    elif method == "powersgd":
        state = powerSGD_hook.PowerSGDState(None, matrix_approximation_rank=4, start_powerSGD_iter=2)
        ddp.register_comm_hook(state, _powersgd_waited)
    elif method == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)


def _worker(rank: int, world: int, tmp: str, cfg: dict) -> None:
    from models.cnn import ModelConfig, build_model

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )  # fmt: skip
    xtr, ytr, xte, yte = torch.load(f"{tmp}/data.pt", weights_only=True)
    out = {}
    for method in METHODS:
        torch.manual_seed(cfg["seed"])
        model = build_model(ModelConfig.preset(cfg["preset"], in_channels=1, num_classes=10))
        ddp = DDP(model)
        _attach(ddp, method)
        opt = torch.optim.SGD(ddp.parameters(), lr=cfg["lr"], momentum=0.9, weight_decay=5e-4)
        accs = []
        for epoch in range(cfg["epochs"]):
            ddp.train()
            order = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(cfg["seed"] * 1000 + epoch))
            mine = order[rank::world]
            steps = len(order) // world // cfg["batch"]  # the same on every rank, as DDP needs
            for s in range(steps):
                idx = mine[s * cfg["batch"] : (s + 1) * cfg["batch"]]
                loss = nn.functional.cross_entropy(ddp(xtr[idx]), ytr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            ddp.eval()
            with torch.no_grad():
                accs.append((model(xte).argmax(1) == yte).float().mean().item())
        out[method] = accs
    if rank == 0:
        torch.save(out, f"{tmp}/result.pt")
    dist.destroy_process_group()


def run_dataset(name: str, cfg: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="tdm-acc-") as tmp:
        torch.save(load(name, Path(tmp)), f"{tmp}/data.pt")
        mp.spawn(_worker, args=(4, tmp, cfg), nprocs=4, join=True)
        curves = torch.load(f"{tmp}/result.pt", weights_only=True)
    target = curves["exact"][-1] - TARGET_MARGIN
    res = {f"acc_{m}": curves[m][-1] for m in METHODS}
    res["acc_delta_pts"] = 100 * (res["acc_2bit"] - res["acc_exact"])
    res["target_acc"] = target
    res["epochs_to_target"] = {m: next((e + 1 for e, a in enumerate(curves[m]) if a >= target), None) for m in METHODS}
    res["curves"] = curves
    res["config"] = cfg
    return res


def main(quick: bool, epochs_digits: int = 15, epochs_mnist1d: int = 12) -> dict:
    from bench._common import print_table, write_result

    started = time.monotonic()
    configs = {
        "digits": dict(
            preset="tiny" if quick else "small",
            epochs=3 if quick else epochs_digits,
            lr=0.05,
            batch=32,
            seed=0,
        ),
        "mnist1d": dict(
            preset="tiny" if quick else "small",
            epochs=3 if quick else epochs_mnist1d,
            lr=0.05,
            batch=32,
            seed=0,
        ),
    }
    results = {name: run_dataset(name, cfg) for name, cfg in configs.items()}
    rows = [
        {"dataset": d, "method": m, "acc": r[f"acc_{m}"], "epochs to target": r["epochs_to_target"][m]}
        for d, r in results.items()
        for m in METHODS
    ]
    print_table(rows, title="Test accuracy, 4 ranks as 2x2, same seeds and epochs")
    summary = {**results, "acc_delta_pts": min(r["acc_delta_pts"] for r in results.values())}
    summary.update(
        goals={"acc_delta_pts": -0.3}, wall_s=time.monotonic() - started, load_average_1min=os.getloadavg()[0]
    )
    print(f"acc_delta_pts (2-bit - exact, worst dataset): {summary['acc_delta_pts']:.2f} (goal >= -0.3)")
    if not quick:
        write_result("compression_accuracy", summary)
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 3 epochs; writes no results")
    parser.add_argument("--epochs-digits", type=int, default=15)
    parser.add_argument("--epochs-mnist1d", type=int, default=12, help="MNIST-1D keeps improving to ~60 epochs")
    a = parser.parse_args()
    main(a.quick, a.epochs_digits, a.epochs_mnist1d)
