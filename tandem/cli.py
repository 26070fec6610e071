"""`tandem` command line: a thin shim that turns flags into configs and calls the job's main(cfg)."""

from __future__ import annotations

import argparse
import sys

from actors.dataset import DataConfig
from actors.train_local import TrainConfig
from kernels.precision import PrecisionConfig


def _shape(text: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be C,H,W (three ints), got {text!r}") from None
    return c, h, w


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="small", help="built-in model: tiny, small, resnet18 (default small)")
    p.add_argument("--model", help="user model as package.module:function returning an nn.Module")
    p.add_argument("--save", default="lean", choices=["lean", "fast"], help="memory mode of the fused op")
    p.add_argument("--data", help="training parquet (file or directory); default: bundled digits")
    p.add_argument("--test-data", help="held-out parquet; default: a split of --data")
    p.add_argument("--image-shape", type=_shape, help="C,H,W when the parquet metadata does not say")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 8; 2 with --smoke)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        help="training dtype (default: chosen from the hardware)",
    )
    p.add_argument("--workdir", default="runs/latest", help="where data and reports go (default runs/latest)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: the whole job in seconds")


def run_config(args: argparse.Namespace):
    from tandem.job import RunConfig

    epochs = args.epochs if args.epochs is not None else (2 if args.smoke else 8)
    return RunConfig(
        preset="tiny" if args.smoke and args.model is None and args.preset == "small" else args.preset,
        model=args.model,
        save=args.save,
        data=DataConfig(train_path=args.data, test_path=args.test_data, image_shape=args.image_shape),
        train=TrainConfig(
            epochs=epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            precision=PrecisionConfig(train_dtype=args.precision),
        ),
        workdir=args.workdir,
        smoke=args.smoke,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tandem", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the end-to-end job on an embedded local Ray (default data: digits)")
    _add_common(run)
    bench = sub.add_parser("bench", help="run a benchmark under bench/")
    bench.add_argument("name", choices=["conv_bn"], help="benchmark name")
    bench.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            from tandem.job import main as run_main

            run_main(run_config(args))
        elif args.command == "bench":
            import importlib

            importlib.import_module(f"bench.{args.name}").main(["--quick"] if args.quick else [])
    except (ValueError, TypeError) as e:
        print(f"tandem: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
