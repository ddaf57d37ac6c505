"""Speed and memory of nst_loss (poly kernel) against the broadcast formulation.

The broadcast formulation is what public PyTorch NST implementations do: pairwise kernels by
broadcasting [B, C, 1, N] * [B, 1, C', N] into a [B, C, C', N] temporary, then summing over N.
It is written here from the formula in papers.md (Huang & Wang 2017), not copied.

Usage:
    python benchmarks/bench_losses.py                       # CPU
    python benchmarks/bench_losses.py --device cuda --repeats 10

Time: forward + backward, the minimum over the runs (the median is printed beside it), since
other jobs on a shared machine can only add time; on CPU the process CPU time is printed too,
with the Linux CPU pressure (share of time runnable tasks waited for a CPU) before each case.
Ratios come from one run of this script.

Before/after a change of the loss code, in one process (same machine state for both):
    cp -r nst_det/losses /tmp/old/losses_before      # before editing (or from git archive)
    python benchmarks/bench_losses.py --compare-with /tmp/old/losses_before
times that copy's nst_loss and the current one alternately (ABAB rounds, minimum of each) for
the poly, gaussian and linear kernels and prints before/after per case.

Memory: on CUDA, torch.cuda.max_memory_allocated (exact, tensors only). On CPU there is no
allocator counter, so the script samples the process resident set size (/proc/self/statm) every
~1 ms while the measured call runs and reports the peak increase over the RSS just before it
(after gc and malloc_trim); allocator caching and sampling make this approximate. The analytic
size of each implementation's largest temporary is printed beside it.
"""

import argparse
import ctypes
import gc
import importlib.util
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nst_det.losses import nst_loss  # noqa: E402
from nst_det.losses.poly2 import cheaper_form  # noqa: E402

GB = 1e9
F32 = 4  # bytes

CASES = [
    # name, B, Cs, Ct, H, W, target speed-up, run the broadcast form at all
    ("classification", 16, 512, 1024, 7, 7, 30, True),
    ("detection", 2, 256, 512, 38, 50, 100, True),
    ("detection-large", 2, 1024, 1024, 50, 84, None, False),
]


def nst_broadcast(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Batch-mean MMD^2 (poly d=2, c=0) with a [B, C, C', N] broadcast temporary per term."""
    s = F.normalize(f_s.flatten(2), dim=2)
    t = F.normalize(f_t.detach().flatten(2), dim=2)

    def mean_kernel(a, b):  # mean_{i,j} (a_i . b_j)^2, via [B, Ca, Cb, N]
        return (a.unsqueeze(2) * b.unsqueeze(1)).sum(-1).pow(2).mean((1, 2))

    return (mean_kernel(t, t) + mean_kernel(s, s) - 2 * mean_kernel(s, t)).mean()


def broadcast_temp_bytes(b, cs, ct, n):
    """Largest single temporary of nst_broadcast: the teacher-teacher [B, Ct, Ct, N]."""
    return b * max(cs, ct) ** 2 * n * F32


def broadcast_peak_estimate(b, cs, ct, n):
    """Rough peak: the largest temporary plus one same-sized tensor alive beside it in backward."""
    return b * n * F32 * (max(cs, ct) ** 2 + cs * ct)


def matmul_shapes(b, cs, ct, n):
    """(batch, m, k, n) of every matrix product nst_loss(poly) runs in forward + backward.

    Mirrors nst_det/losses/poly2.py: the N x N form under autograd, or the C x C form with the
    teacher Gram from three half-size blocks and the fused backward.
    """
    if cheaper_form(cs, ct, n, with_grad=True) == "features":
        return "N x N", [(b, n, ct, n), (b, n, cs, n), (b, n, n, cs), (b, cs, n, n)]
    h = ct // 2
    teacher = (
        [(b, ct, n, ct)] if h < 32 else [(b, h, n, h), (b, ct - h, n, ct - h), (b, h, n, ct - h)]
    )
    forward = [(b, cs, n, cs), (b, cs, n, ct), *teacher]
    backward = [(b, cs, ct, n), (b, cs, cs, n)]
    return "C x C", forward + backward


def ours_temp_bytes(b, cs, ct, n):
    """Largest temporary of nst_loss: a normalised copy of the inputs or the Gram/kernel matrix."""
    form, _ = matmul_shapes(b, cs, ct, n)
    gram = b * n * n if form == "N x N" else b * max(cs, ct) ** 2
    return max(gram, b * max(cs, ct) * n) * F32


class PeakMemory:
    """Peak memory increase during a block: CUDA allocator counter or sampled CPU RSS."""

    def __init__(self, device):
        self.device = device
        self.peak = 0
        self._stop = threading.Event()
        self._page = 4096
        try:
            import resource

            self._page = resource.getpagesize()
        except ImportError:
            pass

    def _rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _sample(self, base):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - base)
            time.sleep(0.001)

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            try:  # return freed heap pages to the OS so the baseline is honest
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except OSError:
                pass
            self._base = self._rss()
            self._thread = threading.Thread(target=self._sample, args=(self._base,), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss() - self._base)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def cpu_pressure():
    """Linux PSI "some avg10" for the CPU: % of the last 10 s in which runnable tasks waited."""
    try:
        with open("/proc/pressure/cpu") as f:
            return float(f.readline().split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        return float("nan")


class Timing:
    """Wall-time min and median, and minimum process CPU time, of repeated runs."""

    def __init__(self, wall, cpu):
        self.min = min(wall)
        self.median = statistics.median(wall)
        self.cpu = min(cpu)
        self.runs = len(wall)


def time_fn(fn, device, repeats, min_seconds=1.0, max_repeats=100):
    """Time fn() after one warm-up run: >= `repeats` runs, more for fast functions.

    Fast functions are repeated until `min_seconds` have elapsed (at most `max_repeats` runs).
    The wall-time minimum is the headline figure because other jobs may share the machine and
    interference only ever adds time. Process CPU time (all threads; CPU runs only) is the work
    done, which waiting for a busy CPU does not inflate.
    """
    fn()
    sync(device)
    wall, cpu = [], []
    start = time.perf_counter()
    while len(wall) < repeats or (
        time.perf_counter() - start < min_seconds and len(wall) < max_repeats
    ):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        sync(device)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return Timing(wall, cpu)


def make_inputs(b, cs, ct, h, w, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    f_s = torch.randn(b, cs, h, w, generator=g).relu().to(device).requires_grad_()
    f_t = torch.randn(b, ct, h, w, generator=g).relu().to(device)
    return f_s, f_t


def fwd_bwd(loss_fn, f_s, f_t):
    def run():
        f_s.grad = None
        loss = loss_fn(f_s, f_t)
        loss.backward()
        return loss

    return run


def measure(loss_fn, f_s, f_t, device, repeats):
    run = fwd_bwd(loss_fn, f_s, f_t)
    timing = time_fn(run, device, repeats)
    with PeakMemory(device) as mem:
        value = run().item()
    return timing, mem.peak, value


def bmm_ceiling(shapes, device, repeats):
    """Time the same matrix products as plain torch.bmm calls on preallocated operands."""
    ops = [
        (torch.randn(b, m, k, device=device), torch.randn(b, k, n, device=device))
        for b, m, k, n in shapes
    ]

    def run():
        for x, y in ops:
            torch.bmm(x, y)

    return time_fn(run, device, repeats).min


def load_losses_copy(path):
    """Import a copy of an nst_det/losses package from `path` under its own package name."""
    path = Path(path).resolve()
    spec = importlib.util.spec_from_file_location(
        "losses_before", path / "__init__.py", submodule_search_locations=[str(path)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["losses_before"] = module
    spec.loader.exec_module(module)
    return module


def compare_before_after(old, new, cases, device, repeats, rounds=4):
    """before/after wall-time ratio of nst_loss fwd+bwd per case and kernel (ABAB rounds)."""
    print(f"== before/after: {old.__file__} vs the current nst_det.losses "
          f"({rounds} alternating rounds, min of each side)")
    ratios = []
    for name, b, cs, ct, h, w, *_ in cases:
        f_s, f_t = make_inputs(b, cs, ct, h, w, device)
        for kernel in ("poly", "gaussian", "linear"):
            runs = {k: fwd_bwd(lambda a, t, fn=fn, kernel=kernel: fn(a, t, kernel), f_s, f_t)
                    for k, fn in (("before", old.nst_loss), ("after", new.nst_loss))}
            best = {"before": float("inf"), "after": float("inf")}
            for _ in range(rounds):
                for k, run in runs.items():
                    best[k] = min(best[k], time_fn(run, device, repeats, min_seconds=0.3).min)
            v_old, v_new = runs["before"]().item(), runs["after"]().item()
            ratio = best["before"] / best["after"]
            ratios.append(ratio)
            print(f"  {name:<16} {kernel:<8}: before {best['before'] * 1e3:8.2f} ms   after "
                  f"{best['after'] * 1e3:8.2f} ms   before/after {ratio:5.2f}x   "
                  f"|value difference| {abs(v_old - v_new):.1e}")
        del f_s, f_t
    geo = 1.0
    for r in ratios:
        geo *= r
    print(f"  geometric mean before/after: {geo ** (1 / len(ratios)):.3f}x "
          "(> 1: the current code is faster)\n")


def fmt_bytes(n):
    return f"{n / GB:7.3f} GB" if n >= 0.1 * GB else f"{n / 1e6:7.1f} MB"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs per measurement (at least; the minimum is reported)")
    p.add_argument(
        "--max-broadcast-gb",
        type=float,
        default=10.0,
        help="run the broadcast form at reduced batch size if its estimated peak exceeds this",
    )
    p.add_argument(
        "--cases",
        default="classification,detection,detection-large",
        help="comma-separated subset of: " + ", ".join(c[0] for c in CASES),
    )
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    p.add_argument("--compare-with", default="",
                   help="folder with a copy of an older nst_det/losses package: print only "
                        "the before/after timing of its nst_loss against the current one")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = args.cases.split(",")
    unknown = set(wanted) - {c[0] for c in CASES}
    if unknown:
        p.error(f"unknown case(s) {sorted(unknown)}")
    device = torch.device(args.device)
    torch.manual_seed(0)

    if args.compare_with:
        import nst_det.losses as current

        compare_before_after(load_losses_copy(args.compare_with), current,
                             [c for c in CASES if c[0] in wanted], device, args.repeats)
        return

    on_cpu = device.type == "cpu"
    print(f"torch {torch.__version__}, device {device}", end="")
    if not on_cpu:
        print(f" ({torch.cuda.get_device_name(device)})")
    else:
        print(f", {torch.get_num_threads()} threads")
    print(
        f"time: forward+backward, wall-time min over >= {args.repeats} runs after 1 warm-up "
        "(median in brackets)" + ("; cpu = min process CPU time (all threads)" if on_cpu else "")
    )
    if on_cpu:
        print("memory: peak RSS increase sampled every ~1 ms during one run (approximate)")
    else:
        print("memory: torch.cuda.max_memory_allocated increase during one run")
    print("float32, poly kernel (degree 2, c 0), random ReLU feature maps\n")

    def report(label, t, mem, temp, value):
        cpu = f"   cpu {t.cpu * 1e3:9.1f} ms" if on_cpu else ""
        print(
            f"  {label:<10}: {t.min * 1e3:9.1f} ms ({t.median * 1e3:.1f}, {t.runs} runs){cpu}   "
            f"peak mem {fmt_bytes(mem)}   largest temporary {fmt_bytes(temp)}   value {value:.6g}"
        )

    for name, b, cs, ct, h, w, target, run_broadcast in CASES:
        if name not in wanted:
            continue
        n = h * w
        form, shapes = matmul_shapes(b, cs, ct, n)
        print(f"== {name}: B={b}, Cs={cs}, Ct={ct}, {h}x{w} (N={n}); nst_loss uses the {form} form")
        if on_cpu:
            print(f"  (CPU pressure from other processes before this case: {cpu_pressure():.0f}%)")
        f_s, f_t = make_inputs(b, cs, ct, h, w, device)
        t_ours, mem_ours, v_ours = measure(nst_loss, f_s, f_t, device, args.repeats)
        report("nst_loss", t_ours, mem_ours, ours_temp_bytes(b, cs, ct, n), v_ours)

        flops = sum(2 * bb * m * k * nn for bb, m, k, nn in shapes)
        t_bmm = bmm_ceiling(shapes, device, args.repeats)
        print(
            f"  GFLOP/s   : nst_loss {flops / t_ours.min / 1e9:7.1f}   plain torch.bmm of the same "
            f"{len(shapes)} products {flops / t_bmm / 1e9:7.1f}   "
            f"({100 * t_bmm / t_ours.min:.0f}% of that ceiling; {flops / 1e9:.2f} GFLOP per step)"
        )

        est_peak = broadcast_peak_estimate(b, cs, ct, n)
        if not run_broadcast:
            print(
                f"  broadcast : not run; its [B, C, C', N] temporary alone would be "
                f"{fmt_bytes(broadcast_temp_bytes(b, cs, ct, n))} "
                f"(estimated peak {fmt_bytes(est_peak)})\n"
            )
            continue

        bb = b
        while bb > 1 and broadcast_peak_estimate(bb, cs, ct, n) > args.max_broadcast_gb * GB:
            bb //= 2
        if bb != b:
            print(
                f"  broadcast at full B={b} estimated peak {fmt_bytes(est_peak)} > "
                f"--max-broadcast-gb; both forms re-measured at REDUCED B={bb}"
            )
            f_s, f_t = make_inputs(bb, cs, ct, h, w, device)
            t_ours, mem_ours, v_ours = measure(nst_loss, f_s, f_t, device, args.repeats)
            report("nst_loss", t_ours, mem_ours, ours_temp_bytes(bb, cs, ct, n), v_ours)
        t_bc, mem_bc, v_bc = measure(nst_broadcast, f_s, f_t, device, args.repeats)
        report("broadcast", t_bc, mem_bc, broadcast_temp_bytes(bb, cs, ct, n), v_bc)
        ratio = t_bc.min / t_ours.min
        verdict = "meets" if ratio >= target else "MISSES"
        cpu_ratio = f"   cpu-time ratio {t_bc.cpu / t_ours.cpu:.1f}x" if on_cpu else ""
        print(
            f"  speed-up  : {ratio:.1f}x wall-time (target >= {target}x: {verdict}){cpu_ratio}   "
            f"memory ratio {mem_bc / max(mem_ours, 1):.0f}x   "
            f"|value difference| {abs(v_bc - v_ours):.1e}\n"
        )
        del f_s, f_t


if __name__ == "__main__":
    main()
