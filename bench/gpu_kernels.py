"""GPU checks of the seed's hardware claims and of our Triton kernels on CUDA (run by bench/gpu_check.sh).

  gpu_tf32.json     tf32_speedup: fp32 matmul time with TF32 off / on (8192^2; the seed: 2x on A100)
  gpu_kernels.json  codec encode/decode Gelem/s (Triton), quant int8 quantize Gelem/s, and
                    gpu_infer samples/s of the resnet18 preset (3x224x224, fp16 autocast, folded BN, batch 256)
  gpu_infer.json    samples_per_s of that inference (the seed: 1200/s on H100 for its own model; not the same model)
Without CUDA it says so and writes nothing.
"""

from __future__ import annotations

import argparse
import sys

import torch

from bench._common import print_table, write_result


def _cuda_time(fn, repeats: int) -> float:
    """Median seconds of fn() on the GPU (events, after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def tf32(repeats: int) -> dict:
    a, b = torch.randn(8192, 8192, device="cuda"), torch.randn(8192, 8192, device="cuda")
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        t_fp32 = _cuda_time(lambda: a @ b, repeats)
        torch.backends.cuda.matmul.allow_tf32 = True
        t_tf32 = _cuda_time(lambda: a @ b, repeats)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return {"tf32_speedup": t_fp32 / t_tf32, "fp32_tflops": 2 * 8192**3 / t_fp32 / 1e12,
            "tf32_tflops": 2 * 8192**3 / t_tf32 / 1e12}  # fmt: skip


def kernels(repeats: int) -> dict:
    from kernels import codec2bit, quant

    n = 1 << 26
    x = torch.randn(n, device="cuda")
    residual = torch.zeros(n, device="cuda")
    payload, _ = codec2bit.encode(x, residual)
    t_enc = _cuda_time(lambda: codec2bit.encode(x, residual), repeats)
    t_dec = _cuda_time(lambda: codec2bit.decode(payload, n), repeats)
    w = torch.randn(4096, 4096, device="cuda")
    t_q = _cuda_time(lambda: quant.quantize(w, torch.int8), repeats)
    return {"codec_encode_gelem_s": n / t_enc / 1e9, "codec_decode_gelem_s": n / t_dec / 1e9,
            "quant_int8_gelem_s": w.numel() / t_q / 1e9}  # fmt: skip


def infer(repeats: int) -> dict:
    from models.cnn import ModelConfig, build_model

    model = build_model(ModelConfig.preset("resnet18", in_channels=3, num_classes=1000)).cuda().eval()
    x = torch.randn(256, 3, 224, 224, device="cuda")

    def run():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
            model(x)

    t = _cuda_time(run, repeats)
    return {"samples_per_s": 256 / t, "model": "resnet18 preset, 3x224x224, fp16 autocast, batch 256"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_kernels: no CUDA device; nothing measured")
        return 0
    repeats = 5 if args.quick else 20
    rows = []
    for name, fn in (("gpu_tf32", tf32), ("gpu_kernels", kernels), ("gpu_infer", infer)):
        res = fn(repeats)
        write_result(name, res)
        rows += [{"result": name, "key": k, "value": v} for k, v in res.items()]
    print_table(rows, title=f"GPU checks on {torch.cuda.get_device_name(0)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
