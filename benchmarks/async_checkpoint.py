"""Blocked time of an asynchronous (DCP async_save) vs a synchronous checkpoint save, for a >= 100 MB model + AdamW.

    .venv/bin/python benchmarks/async_checkpoint.py                  # 32M params (128 MB fp32; 384 MB with AdamW state)
    .venv/bin/python benchmarks/async_checkpoint.py --mparams 100 --repeat 5 --dir /path/on/the/real/disk

"blocked" is the time `Checkpointer.save()` keeps the training step waiting: for sync the whole write, manifest
hashing and rename; for async only the copy of the state to host memory (the write, hashing and commit run in
the background and finish in `finalize()`, whose own wait is reported separately when it is called right away).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from gigafactory.train.checkpoint import Checkpointer


def build(mparams: float, device: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    width = 2048
    layers = max(1, round(mparams * 1e6 / (width * width + width)))
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, width, device=device)).sum().backward()
    opt.step()  # creates the Adam moments, so the checkpoint is 3x the weights
    opt.zero_grad()
    return model, opt


def measure(root: Path, model, opt, async_save: bool, repeat: int) -> tuple[list[float], list[float]]:
    saver = Checkpointer(root, keep=1, async_save=async_save)
    blocked, finish = [], []
    for i in range(repeat + 1):  # the first save warms up (allocations, thread pool); it is not counted
        t0 = time.perf_counter()
        saver.save(i + 1, model, opt, {"step": i + 1}, {})
        t1 = time.perf_counter()
        saver.finalize()
        t2 = time.perf_counter()
        if i:
            blocked.append(t1 - t0)
            finish.append(t2 - t0)
    saver.close()
    return blocked, finish


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mparams", type=float, default=32.0, help="Model size in millions of parameters (fp32).")
    ap.add_argument("--repeat", type=int, default=3, help="Timed saves per mode (after one warm-up save).")
    ap.add_argument("--dir", default="", help="Directory to write checkpoints in (default: a temporary directory).")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    model, opt = build(args.mparams, args.device)
    n = sum(p.numel() for p in model.parameters())
    mb = 3 * n * 4 / 1e6
    base = Path(args.dir or tempfile.mkdtemp(prefix="gf-ckpt-bench-"))
    print(f"model: {n / 1e6:.1f}M params ({n * 4 / 1e6:.0f} MB fp32), checkpoint ~{mb:.0f} MB with AdamW moments; device {args.device}; dir {base}")
    try:
        rows = {}
        for mode, flag in (("sync", False), ("async", True)):
            blocked, finish = measure(base / mode, model, opt, flag, args.repeat)
            rows[mode] = (statistics.median(blocked), statistics.median(finish))
            print(f"{mode:5s}: blocked {rows[mode][0]:.3f} s (median of {args.repeat}: {', '.join(f'{b:.3f}' for b in blocked)}); "
                  f"save complete after {rows[mode][1]:.3f} s")
        ratio = rows["async"][0] / rows["sync"][0]
        print(f"async blocks the step for {ratio:.1%} of a synchronous save ({'PASS' if ratio < 0.10 else 'FAIL'}: target < 10%)")
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
