"""Pricing a job split over several sites joined by a slow link: synchronous data parallelism vs DiLoCo every H steps.

Each site runs the layout the planner finds for its share of the GPUs (one replica group, docs/cross-site.md); the
global batch is the sites' batches together. Across sites, one copy of the gradients (sync DP, every step) or of the
pseudo-gradient (DiLoCo, every H steps) is ring-allreduced: each site sends 2 (S-1)/S x params x 4 bytes (fp32, as
the trainer sends them) over the link, and the ring's 2 (S-1) hops each pay the latency. The transfer is taken as
exposed (not overlapped with compute: Streaming DiLoCo's overlap is not modelled), the same model the simulated link
of `train --fault_tolerance.link_*` applies. What this cannot price is DiLoCo's quality: at equal tokens its loss is
somewhat higher, so the table states how many more tokens DiLoCo may need before sync DP is faster after all.
"""

from __future__ import annotations

import re

from gigafactory.errors import UserError

DILOCO_H = (8, 32, 128, 500)
GRAD_BYTES_PER_PARAM = 4


def parse_link(text: str) -> tuple[float, float]:
    """'400Gbps,10ms' -> (400.0 Gbit/s, 0.010 s); units Gbps/Tbps/Mbps and ms/us/s."""
    m = re.fullmatch(r"\s*([\d.]+)\s*(Mbps|Gbps|Tbps)\s*,\s*([\d.]+)\s*(us|ms|s)\s*", text, flags=re.IGNORECASE)
    if not m:
        raise UserError(f"--site-link {text!r} must be BANDWIDTH,LATENCY such as 400Gbps,10ms (Mbps/Gbps/Tbps, us/ms/s)")
    gbps = float(m[1]) * {"mbps": 1e-3, "gbps": 1.0, "tbps": 1e3}[m[2].lower()]
    latency = float(m[3]) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[m[4].lower()]
    if gbps <= 0:
        raise UserError(f"--site-link {text!r}: the bandwidth must be > 0")
    return gbps, latency


def sync_time_s(params: int, sites: int, gbps: float, latency_s: float) -> float:
    """One cross-site ring allreduce of the fp32 gradients (or pseudo-gradients) of one model copy."""
    wire = 2 * (sites - 1) / sites * params * GRAD_BYTES_PER_PARAM
    return 2 * (sites - 1) * latency_s + wire * 8 / (gbps * 1e9)


def price_sites(site_step_s: float, site_tokens_per_step: int, params: int, sites: int, gpus: int, tokens: float,
                usd_per_gpu_hour: float, gbps: float, latency_s: float) -> list[dict]:
    """Step time, days and $ of sync DP and of DiLoCo at each H, and how many more tokens DiLoCo may need (for the
    same loss) before sync DP is faster."""
    link = sync_time_s(params, sites, gbps, latency_s)
    out = []
    for mode, h in [("sync DP", 1)] + [(f"DiLoCo H={h}", h) for h in DILOCO_H]:
        step = site_step_s + link / h
        tokens_per_s = sites * site_tokens_per_step / step
        days = tokens / tokens_per_s / 86400
        out.append({"mode": mode, "sync_every": h, "step_time_s": step, "link_s_per_step": link / h,
                    "cross_site_TB_per_site": tokens / (sites * site_tokens_per_step) / h * 2 * (sites - 1) / sites * params * GRAD_BYTES_PER_PARAM / 1e12,
                    "tokens_per_s": tokens_per_s, "days": days, "cost_usd": gpus * days * 24 * usd_per_gpu_hour})
    sync_days = out[0]["days"]
    for r in out[1:]:
        r["max_extra_tokens"] = sync_days / r["days"] - 1  # DiLoCo is faster unless it needs this many more tokens
    return out


def render(rows: list[dict], title: str) -> None:
    print(f"\n# {title}")
    print(f"{'mode':<14} {'step s':>8} {'link s/step':>11} {'days':>8} {'$M':>9} {'TB/site':>9}  DiLoCo wins unless it needs")
    for r in rows:
        extra = f"> {r['max_extra_tokens']:.0%} more tokens for the same loss" if "max_extra_tokens" in r else ""
        print(f"{r['mode']:<14} {r['step_time_s']:>8.3f} {r['link_s_per_step']:>11.3f} {r['days']:>8.1f} {r['cost_usd'] / 1e6:>9.1f} "
              f"{r['cross_site_TB_per_site']:>9.1f}  {extra}")
