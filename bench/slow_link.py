"""Gradient allreduce over a genuinely slow link: 2 "nodes" as network namespaces, 2 gloo ranks in each (issue 3).

The benchmark creates two namespaces joined by a veth pair (addresses 10.231.x.1/.2 that exist only inside them),
shapes the pair with `tc ... tbf` (100 Mbit, 1 Gbit, then unshaped), and for each link runs 4 ranks (2 per
namespace; intra-node traffic stays inside a namespace, unshaped) through two workloads:
  grad11m   DDP over a module with the ResNet-18 preset's parameter shapes (11.2M fp32) whose loss is a cheap
            dot product, so a step is backward + gradient communication;
  small     a real training step (forward, backward, SGD) of the `small` CNN preset on 8x8 inputs.
Methods, side by side on the same link: flat allreduce (DDP default), torch's fp16_compress_hook, torch's
PowerSGD (rank 4; each bucket's future waited inside the hook, as gloo needs), and collectives/hook.py's
hierarchical path with exact, 2-bit (TwoBitEF) and low-rank (rank 4) inter-node codecs, and the auto mode.
Step time = median over measured steps of the slowest rank; link bytes = veth tx + rx per measured step.

Keys (grad11m): speedup_100mbit (flat / hierarchical 2-bit, goal >= 5), speedup_1gbit (goal >= 1.5),
vs_powersgd_100mbit / _1gbit (hierarchical 2-bit / PowerSGD), auto_mode_fast_link_ratio (auto / flat, unshaped,
goal <= 1.05), link_bytes_per_step (per link, workload, method), step_s (the full table), auto_decisions (per link
and workload: whether auto compressed, the Gbit/s it probed), auto_rule_per_link (collectives/hook.py's auto
constants each link was measured under). Links kept from an earlier run (--links) lose their `auto` columns when
those were measured under other constants (auto_dropped_stale names them): they would show what an old rule did.
Needs root (netns, tc); without it prints why and exits 0 writing nothing. Namespaces are deleted on every exit
path (finally, SIGTERM/SIGINT); every link run and the whole benchmark are bounded in time.
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LINKS = {"100mbit": ("100mbit", "128kbit"), "1gbit": ("1gbit", "1mbit"), "unshaped": None}  # rate, burst
METHODS = ("flat", "fp16", "powersgd", "hier_exact", "hier_2bit", "hier_lowrank", "auto")
WORKLOADS = ("grad11m", "small")
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- worker side
def _powersgd_waited(state, bucket):
    """torch's PowerSGD hook with the bucket's future waited here: on gloo the stock hook's chained futures
    interleave collectives of different buckets across ranks (a collective mismatch at this size)."""
    import torch
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

    fut = torch.futures.Future()
    fut.set_result(powerSGD_hook.powerSGD_hook(state, bucket).wait())
    return fut


def _attach(ddp, method: str, per_node: int):
    """Registers the method's comm hook on the DDP model (flat: none); returns the hierarchical hook's state
    (None for the others)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    from collectives.hook import HookConfig, register
    from collectives.internode import LowRank, NoCompression, TwoBitEF

    if method == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif method == "powersgd":
        state = powerSGD_hook.PowerSGDState(None, matrix_approximation_rank=4, start_powerSGD_iter=2)
        ddp.register_comm_hook(state, _powersgd_waited)
    elif method != "flat":
        codec = {"hier_exact": NoCompression(), "hier_lowrank": LowRank(rank=4)}.get(method, TwoBitEF())
        mode = "auto" if method == "auto" else "always"
        return register(ddp, HookConfig(codec=codec, mode=mode, warmup_steps=1, ranks_per_node=per_node))
    return None


def _workload(name: str, quick: bool):
    """(model, step(ddp) -> None)."""
    import torch
    import torch.nn as nn

    from models.cnn import ModelConfig, build_model

    if name == "grad11m":
        shapes = [p.shape for p in build_model(ModelConfig.preset("resnet18")).parameters()]
        if quick:
            shapes = shapes[:8]  # the stem and first blocks: ~0.1M values

        class GradOnly(nn.Module):
            """Parameters of ResNet-18's shapes; loss = sum(p * r): the gradient is r (random, fixed)."""

            def __init__(self):
                super().__init__()
                g = torch.Generator().manual_seed(0)
                self.ps = nn.ParameterList(nn.Parameter(torch.zeros(s)) for s in shapes)
                self.rs = [torch.randn(s, generator=g) for s in shapes]

            def forward(self, x):
                return sum((p * r).sum() for p, r in zip(self.ps, self.rs, strict=True)) * x

        def step(ddp):
            ddp.zero_grad(set_to_none=False)
            ddp(torch.ones(())).backward()

        return GradOnly(), step

    model = build_model(ModelConfig.preset("small"))
    opt_holder = {}
    g = torch.Generator().manual_seed(int(os.environ["RANK"]))
    x, y = torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)

    def step(ddp):
        opt = opt_holder.setdefault("opt", torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9))
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()

    return model, step


def _link_bytes(ifname: str) -> int:
    stats = Path("/sys/class/net") / ifname / "statistics"
    return int((stats / "tx_bytes").read_text()) + int((stats / "rx_bytes").read_text())


def worker(args) -> None:
    import datetime

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.collective_timeout))
    deadline = time.monotonic() + args.link_budget
    results: dict = {}
    for wl in WORKLOADS:
        results[wl] = {}
        for method in METHODS:
            go = torch.tensor([1.0 if time.monotonic() < deadline else 0.0])
            dist.broadcast(go, 0)  # one decision for all ranks
            if go.item() == 0:
                continue
            model, step = _workload(wl, args.quick)
            ddp = DDP(model)
            state = _attach(ddp, method, per_node=2)
            times, b0 = [], 0
            for i in range(args.warmup + args.steps):
                dist.barrier()
                if i == args.warmup:
                    b0 = _link_bytes(args.ifname)
                t0 = time.perf_counter()
                step(ddp)
                t = torch.tensor([time.perf_counter() - t0])
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                if i >= args.warmup:
                    times.append(t.item())
            link = (_link_bytes(args.ifname) - b0) / args.steps
            results[wl][method] = {"step_s": statistics.median(times), "link_bytes_per_step": link}
            if method == "auto":  # what the rule decided here, so the column is tied to the rule that made it
                results[wl][method].update(compressed=state.compress, probed_gbit=state.measured_gbit)
            if rank == 0:
                print(
                    f"  {wl:8s} {method:13s} {statistics.median(times):8.3f} s  {link / 1e6:9.2f} MB/step",
                    flush=True,
                )
            del ddp, model
    if rank == 0:
        Path(args.out).write_text(json.dumps(results))
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------- parent side
class Namespaces:
    """Two network namespaces joined by a shaped veth pair; `close()` deletes them (idempotent)."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.ns = (f"tdm{tag}a", f"tdm{tag}b")
        self.veth = (f"vtdm{tag}a", f"vtdm{tag}b")
        sub = os.getpid() % 250 + 1
        self.addr = (f"10.231.{sub}.1", f"10.231.{sub}.2")
        self.created: list[str] = []

    def _ip(self, *cmd: str) -> None:
        subprocess.run(["ip", *cmd], check=True, capture_output=True, timeout=30)

    def open(self) -> "Namespaces":
        for ns in self.ns:
            self._ip("netns", "add", ns)
            self.created.append(ns)
        self._ip("link", "add", self.veth[0], "type", "veth", "peer", "name", self.veth[1])
        for ns, veth, addr in zip(self.ns, self.veth, self.addr, strict=True):
            self._ip("link", "set", veth, "netns", ns)
            self._ip("-n", ns, "addr", "add", f"{addr}/24", "dev", veth)
            self._ip("-n", ns, "link", "set", veth, "up")
            self._ip("-n", ns, "link", "set", "lo", "up")
        return self

    def shape(self, link) -> None:
        """tbf on both ends (each shapes its egress), or no qdisc for the unshaped link."""
        for ns, veth in zip(self.ns, self.veth, strict=True):
            tc = ["ip", "netns", "exec", ns, "tc", "qdisc"]
            subprocess.run([*tc, "del", "dev", veth, "root"], capture_output=True, timeout=30)  # may not exist
            if link is not None:
                rate, burst = link
                subprocess.run(
                    [*tc, "add", "dev", veth, "root", "tbf", "rate", rate, "burst", burst, "latency", "100ms"],
                    check=True, capture_output=True, timeout=30,
                )  # fmt: skip

    def close(self) -> None:
        while self.created:  # deleting a namespace deletes its end of the veth pair, and so the pair
            subprocess.run(["ip", "netns", "del", self.created.pop()], capture_output=True, timeout=30)


def _run_link(nets: Namespaces, link: str, args, tmp: Path, port: int) -> dict | None:
    out = tmp / f"{link}.json"
    env_base = {
        **os.environ,
        "MASTER_ADDR": nets.addr[0],
        "MASTER_PORT": str(port),
        "WORLD_SIZE": "4",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor"),
    }
    procs = []
    try:
        for rank in range(4):
            node = rank // 2
            env = {
                **env_base,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank % 2),
                "GLOO_SOCKET_IFNAME": nets.veth[node],
            }
            cmd = ["ip", "netns", "exec", nets.ns[node], sys.executable, "-m", "bench.slow_link", "--worker",
                   "--out", str(out), "--ifname", nets.veth[node], "--warmup", str(args.warmup),
                   "--steps", str(args.steps), "--link-budget", str(args.link_budget),
                   "--collective-timeout", str(args.collective_timeout)]  # fmt: skip
            cmd += ["--quick"] if args.quick else []
            procs.append(subprocess.Popen(cmd, env=env, cwd=REPO))
        deadline = time.monotonic() + args.link_budget + 120  # + start-up and the method in flight
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        print(f"link {link}: over its time budget, stopping its ranks", flush=True)
    finally:
        for p in procs:  # only the processes started here, by handle
            if p.poll() is None:
                p.kill()
                p.wait()
    return json.loads(out.read_text()) if out.exists() else None


def _warm_codec_cache(cache: Path) -> None:
    """Compiles the CPU codec once so the 4 ranks load it from inductor's disk cache instead of compiling."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    import torch

    from kernels import codec2bit

    x, r = torch.randn(1 << 16), torch.zeros(1 << 16)
    payload, _ = codec2bit.encode(x, r, residual_out=r)
    codec2bit.decode(payload, x.numel(), out=torch.empty_like(x))
    codec2bit.decode_add_(torch.zeros_like(x), payload)


def auto_rule() -> dict:
    """The auto mode's constants (collectives/hook.py HookConfig) that the `auto` columns are measured under."""
    from collectives.hook import HookConfig

    cfg = HookConfig()
    return {k: getattr(cfg, k) for k in ("auto_saved_bits_per_elem", "auto_codec_fixed_s", "auto_codec_s_per_elem")}


def drop_stale_auto(runs: dict, rules: dict, rule: dict) -> list[str]:
    """Removes the `auto` entries of links measured under another auto rule than `rule` (`rules`: the rule
    recorded per link; a link without one predates the record): such a column says what an old rule did.
    Returns the links dropped."""
    stale = []
    for link, per_wl in runs.items():
        if rules.get(link) != rule and any("auto" in per_m for per_m in per_wl.values()):
            for per_m in per_wl.values():
                per_m.pop("auto", None)
            stale.append(link)
    return stale


def summarize(runs: dict) -> dict:
    def t(link, method, wl="grad11m"):
        return runs.get(link, {}).get(wl, {}).get(method, {}).get("step_s")

    def ratio(a, b):
        return a / b if a is not None and b is not None else None

    return {
        "speedup_100mbit": ratio(t("100mbit", "flat"), t("100mbit", "hier_2bit")),
        "speedup_1gbit": ratio(t("1gbit", "flat"), t("1gbit", "hier_2bit")),
        "vs_powersgd_100mbit": ratio(t("100mbit", "hier_2bit"), t("100mbit", "powersgd")),
        "vs_powersgd_1gbit": ratio(t("1gbit", "hier_2bit"), t("1gbit", "powersgd")),
        "auto_mode_fast_link_ratio": ratio(t("unshaped", "auto"), t("unshaped", "flat")),
        "speedup_small_100mbit": ratio(t("100mbit", "flat", "small"), t("100mbit", "hier_2bit", "small")),
        "speedup_small_1gbit": ratio(t("1gbit", "flat", "small"), t("1gbit", "hier_2bit", "small")),
        "auto_decisions": {
            link: {
                wl: {k: r["auto"].get(k) for k in ("compressed", "probed_gbit")} for wl, r in res.items() if "auto" in r
            }
            for link, res in runs.items()
        },
        "link_bytes_per_step": {
            link: {wl: {m: v["link_bytes_per_step"] for m, v in r.items()} for wl, r in res.items()}
            for link, res in runs.items()
        },
        "step_s": {
            link: {wl: {m: v["step_s"] for m, v in r.items()} for wl, r in res.items()} for link, res in runs.items()
        },
    }


def main(args) -> int:
    if os.geteuid() != 0:
        print("bench/slow_link needs root (network namespaces, tc); not root: nothing measured, nothing written.")
        return 0
    from bench._common import RESULTS, print_table, write_result

    nets = Namespaces()

    def on_signal(signum, frame):
        raise SystemExit(128 + signum)  # unwinds through the finally below

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    started = time.monotonic()
    runs: dict = {}
    measured_at: dict = {}
    measured_steps: dict = {}
    rules: dict = {}  # the auto rule each link's `auto` column was measured under
    saved = RESULTS / "slow_link.json"
    if set(args.links) != set(LINKS) and saved.exists():  # re-measure some links, keep the others
        old_result = json.loads(saved.read_text())
        for link, per_wl in old_result.get("step_s", {}).items():
            decisions = old_result.get("auto_decisions", {}).get(link, {})
            runs[link] = {
                wl: {
                    m: {
                        "step_s": t,
                        "link_bytes_per_step": old_result["link_bytes_per_step"][link][wl][m],
                        **(decisions.get(wl, {}) if m == "auto" else {}),
                    }
                    for m, t in per_m.items()
                }
                for wl, per_m in per_wl.items()
            }
        rules.update(old_result.get("auto_rule_per_link", {}))
        first = {link: old_result.get("timestamp") for link in old_result.get("step_s", {})}
        measured_at.update(old_result.get("measured_at") or first)
        measured_steps.update(old_result.get("measured_steps") or {link: old_result["steps"] for link in first})
    try:
        with tempfile.TemporaryDirectory(prefix="tdm-slowlink-") as tmp_name:
            tmp = Path(tmp_name)
            _warm_codec_cache(tmp / "inductor")
            nets.open()
            for i, (link, shape) in enumerate(LINKS.items()):
                if link not in args.links:
                    continue
                if time.monotonic() - started > args.time_limit:
                    print(f"time limit reached, skipping {link}", flush=True)
                    continue
                nets.shape(shape)
                print(f"link {link}:", flush=True)
                res = _run_link(nets, link, args, tmp, port=29500 + os.getpid() % 1000 + i)
                if res:
                    runs[link] = res
                    measured_at[link] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                    measured_steps[link] = args.steps
                    rules[link] = auto_rule()
    finally:
        nets.close()
        for s, h in old.items():
            signal.signal(s, h)
    stale = drop_stale_auto(runs, rules, auto_rule())
    if stale:
        print(f"auto columns of {stale} were measured under an earlier auto rule: dropped (re-measure them)")
    summary = summarize(runs)
    rows = [
        {"link": link, "workload": wl, "method": m, "step s": v["step_s"],
         "MB/step on link": v["link_bytes_per_step"] / 1e6}
        for link, res in runs.items() for wl, r in res.items() for m, v in r.items()
    ]  # fmt: skip
    print_table(rows, title="Allreduce over 2 namespaces x 2 gloo ranks")
    for k in (
        "speedup_100mbit",
        "speedup_1gbit",
        "vs_powersgd_100mbit",
        "vs_powersgd_1gbit",
        "auto_mode_fast_link_ratio",
    ):
        print(f"{k}: {summary[k]}")
    summary.update(
        goals={"speedup_100mbit": 5.0, "speedup_1gbit": 1.5, "auto_mode_fast_link_ratio": 1.05},
        quick=args.quick,
        measured_at=measured_at,
        warmup=args.warmup,
        measured_steps=measured_steps,
        auto_rule_per_link={link: rules[link] for link in runs if link in rules},
        auto_dropped_stale=stale,
        load_average_1min_at_end=os.getloadavg()[0],
        wall_s=time.monotonic() - started,
    )
    if not args.quick:
        write_result("slow_link", summary)
    return 0


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke size: the first 8 ResNet-18 tensors, 1 measured step; writes no results",
    )
    p.add_argument(
        "--warmup", type=int, default=2, help="unmeasured steps per method (DDP bucket rebuild, hook warm-up)"
    )
    p.add_argument("--steps", type=int, default=3, help="measured steps per method")
    p.add_argument("--link-budget", type=float, default=420.0, help="seconds per link before methods are skipped")
    p.add_argument("--time-limit", type=float, default=1500.0, help="seconds for the whole benchmark")
    p.add_argument("--collective-timeout", type=float, default=300.0, help="gloo timeout, seconds")
    p.add_argument(
        "--links", type=lambda v: v.split(","), default=list(LINKS),
        help="comma list of links to (re)measure; the others are kept from bench/results/slow_link.json",
    )  # fmt: skip
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--ifname", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps = min(args.steps, 1)
        args.warmup = min(args.warmup, 2)
    return args


if __name__ == "__main__":
    a = _parse()
    sys.exit(worker(a) if a.worker else main(a))
