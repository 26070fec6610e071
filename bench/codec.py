"""2-bit codec throughput per CPU core and bytes on the wire (issue 3).

One thread (`torch.set_num_threads(1)`), timed by that thread's CPU time (`time.thread_time`: values per CPU-second
of one core, so other jobs on a shared machine do not count against it; wall-clock rates are reported as *_wall),
a ResNet-18-sized gradient (11.2M fp32 values; `--quick`: 2^22), the
inductor-compiled CPU path side by side with the eager PyTorch reference, interleaved repeats, medians:
  encode_melem_s        million values/s through encode (residual add + block stats + pack), residual
                        updated in place and payload into a buffer, as the collective does     goal >= 300
  decode_melem_s        million values/s through decode into a buffer                        goal >= 300
  decode_add_melem_s    the decode-and-accumulate form (out += decode)
  *_fresh_melem_s       the same with freshly allocated outputs (page faults of a new 45 MB tensor included)
  bit_exact             compiled path == reference, payload and residual
  wire_bytes_ratio      fp32 bytes / payload bytes, scales counted                          goal >= 15
  rel_sq_error          |x - decode(encode(x))|^2 / |x|^2 on Gaussian data (Lloyd-Max: 0.1175)
Writes bench/results/codec.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from bench._common import print_table, write_result
from kernels import codec2bit

GOALS = {"encode_melem_s": 300.0, "decode_melem_s": 300.0, "wire_bytes_ratio": 15.0}


def cpu_and_wall_medians(fns: dict, repeats: int, warmup: int = 1) -> tuple[dict, dict]:
    """Median thread CPU time and wall time (s) of each callable, run round-robin (interleaved)."""
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    wall: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            c0, w0 = time.thread_time(), time.perf_counter()
            fn()
            if i >= warmup:
                cpu[name].append(time.thread_time() - c0)
                wall[name].append(time.perf_counter() - w0)
    return {k: statistics.median(v) for k, v in cpu.items()}, {k: statistics.median(v) for k, v in wall.items()}


def main(numel: int, block: int, repeats: int) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(numel)
    residual = 0.1 * torch.randn(numel)
    acc = torch.zeros(numel)
    t0 = time.perf_counter()
    payload, _ = codec2bit.encode(x, residual, block)
    codec2bit.decode(payload, numel, block)
    codec2bit.decode_add_(acc, payload, block)
    compile_s = time.perf_counter() - t0

    ref_payload, ref_residual = codec2bit.encode(x, residual, block, compiled=False)
    got_payload, got_residual = codec2bit.encode(x, residual, block)
    bit_exact = torch.equal(ref_payload, got_payload) and torch.equal(ref_residual, got_residual)

    res_buf, out_buf = residual.clone(), torch.empty(numel)
    pay_buf = torch.empty_like(payload)
    fns = {}
    for compiled in (True, False):
        tag = "compiled" if compiled else "reference"
        fns[f"encode_{tag}"] = lambda c=compiled: codec2bit.encode(
            x, res_buf, block, residual_out=res_buf, payload_out=pay_buf, compiled=c
        )
        fns[f"decode_{tag}"] = lambda c=compiled: codec2bit.decode(payload, numel, block, out=out_buf, compiled=c)
        fns[f"decode_add_{tag}"] = lambda c=compiled: codec2bit.decode_add_(acc, payload, block, compiled=c)
    fns["encode_fresh_compiled"] = lambda: codec2bit.encode(x, residual, block)
    fns["decode_fresh_compiled"] = lambda: codec2bit.decode(payload, numel, block)
    med, med_wall = cpu_and_wall_medians(fns, repeats=repeats)
    melem = {k: numel / v / 1e6 for k, v in med.items()}
    melem_wall = {k: numel / v / 1e6 for k, v in med_wall.items()}

    x_hat = codec2bit.decode(codec2bit.encode(x, None, block, compiled=False)[0], numel, block, compiled=False)
    result = {
        "encode_melem_s": melem["encode_compiled"],
        "decode_melem_s": melem["decode_compiled"],
        "decode_add_melem_s": melem["decode_add_compiled"],
        "encode_fresh_melem_s": melem["encode_fresh_compiled"],
        "decode_fresh_melem_s": melem["decode_fresh_compiled"],
        "encode_reference_melem_s": melem["encode_reference"],
        "decode_reference_melem_s": melem["decode_reference"],
        "wire_bytes_ratio": 4 * numel / codec2bit.payload_nbytes(numel, block),
        "rel_sq_error": (((x_hat - x) ** 2).sum() / (x**2).sum()).item(),
        "encode_melem_s_wall": melem_wall["encode_compiled"],
        "decode_melem_s_wall": melem_wall["decode_compiled"],
        "timing": "thread CPU time (per core); *_wall: wall clock",
        "bit_exact": bit_exact,
        "load_average_1min": os.getloadavg()[0],
        "numel": numel,
        "block": block,
        "threads": 1,
        "first_call_compile_s": compile_s,
        "goals": GOALS,
    }
    rows = [
        {
            "path": tag,
            "op": op,
            "Melem/s (cpu)": melem[f"{op}_{tag}"],
            "Melem/s (wall)": melem_wall[f"{op}_{tag}"],
            "cpu ms": med[f"{op}_{tag}"] * 1e3,
        }
        for tag in ("compiled", "reference")
        for op in ("encode", "decode", "decode_add")
    ] + [
        {
            "path": "compiled",
            "op": f"{op} (fresh outputs)",
            "Melem/s (cpu)": melem[f"{op}_fresh_compiled"],
            "Melem/s (wall)": melem_wall[f"{op}_fresh_compiled"],
            "cpu ms": med[f"{op}_fresh_compiled"] * 1e3,
        }
        for op in ("encode", "decode")
    ]
    print_table(rows, title=f"2-bit codec, {numel} values, block {block}, 1 thread")
    print(
        f"wire_bytes_ratio {result['wire_bytes_ratio']:.3f} (goal >= 15), rel_sq_error "
        f"{result['rel_sq_error']:.4f}, bit-exact {bit_exact}, first call (compile) {compile_s:.1f} s, "
        f"load average {result['load_average_1min']:.1f} on {os.cpu_count()} cores"
    )
    write_result("codec", result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2^22 values, 5 repeats")
    parser.add_argument("--block", type=int, default=codec2bit.DEFAULT_BLOCK)
    args = parser.parse_args()
    main(1 << 22 if args.quick else 11_200_000, args.block, 5 if args.quick else 9)
