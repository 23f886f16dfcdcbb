"""Benchmark: fedsilo secure_agg vs Flower 1.42 SecAgg+ primitives on the same vectors.

Usage: python bench/secure_agg.py [--params 7000000] [--silos 3,5,10] [--json] [--no-flower]
                                 [--clock wall|cpu]

Any n from 3 to 50 works (weights cycle through 100..1000 examples, under the cap w_max = 1000;
the default codec's headroom allows up to 63 silos at 32 bits).

Ours: per-silo ``SecAggClient.mask`` (encode + self mask + all pairwise masks), server
``collect_unmask`` (rebuild seeds/keys, remove masks, decode) with 0 and 1 dropouts, bytes
of every reply a silo uploads. Flower: what ``secaggplus_mod`` does per client in stage
"collect masked vectors" (weight ratio, quantize, factor_combine, pseudo_rand_gen self mask,
ECDH + pseudo_rand_gen pairwise masks, mod) and what ``SecAggPlusWorkflow.unmask_stage``
does on the server (combine_shares, pseudo_rand_gen removal, mod, dequantize), with
num_shares = n (every pair masked, as in ours). Flower's defaults: clipping_range 8,
quantization_range 2^22, modulus 2^32, max_weight 1000.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from secure_agg.flower import aggregate_bounds
from secure_agg.messages import pack
from secure_agg.round_config import RoundConfig
from secure_agg.server import ServerCoordinator
from secure_agg.simulate import Federation, context_hash_of

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
"""``--clock cpu`` measures this process's CPU time, which a machine shared with other work
inflates far less than wall time (both sides run single-threaded here)."""
W_MAX = 1000.0
"""Public weight cap of both sides (Flower's ``max_weight`` default)."""


def _vectors(n: int, m: int) -> tuple[list[str], dict, dict]:
    rng = np.random.default_rng(0)
    names = [f"hospital-{i:02d}" for i in range(n)]
    vecs = {k: (rng.standard_normal(m, dtype=np.float32) * 0.01) for k in names}
    # 100 .. 1000 examples, cycling: never above the public cap W_MAX, whatever n
    weights = {k: float(100 * (1 + i % 10)) for i, k in enumerate(names)}
    return names, vecs, weights


# ----------------------------------------------------------------------------------- ours
def bench_ours(n: int, m: int, dropouts: int, clock=time.perf_counter) -> dict:
    names, vecs, weights = _vectors(n, m)
    fed = Federation.create(names)
    cfg = RoundConfig("bench", 1, tuple(names), m, w_max=W_MAX, counter_names=("examples",))
    # the server checks the decoded sums as the Flower adapter does (part of unmask_s)
    srv = ServerCoordinator(cfg, bounds=aggregate_bounds(cfg.counter_names, W_MAX))
    upload = {k: 0 for k in names}

    def sent(reps: dict) -> dict:
        for k, r in reps.items():
            upload[k] += len(pack(r))
        return reps

    reqs = srv.advertise_requests()
    states, reps = {}, {}
    for k in names:
        states[k], reps[k] = fed.clients[k].advertise(reqs[k], context_hash_of(b"model"))
    reqs = srv.collect_advertisements(sent(reps))
    reqs = srv.collect_shares(sent({k: fed.clients[k].share(states[k], reqs[k]) for k in names}))
    gone = set(names[:dropouts])
    mask_times, reps = [], {}
    for k in names:
        if k in gone:
            continue
        t0 = clock()
        reps[k] = fed.clients[k].mask(
            states[k], reqs[k], vecs[k], weights[k], {"examples": weights[k]}
        )
        mask_times.append(clock() - t0)
    sent(reps)
    t0 = clock()
    reqs = srv.collect_masked(reps)
    t_sum = clock() - t0
    reqs = srv.collect_consistency(
        sent({k: fed.clients[k].consistency(states[k], reqs[k]) for k in reqs})
    )
    reps = sent({k: fed.clients[k].unmask(states[k], reqs[k]) for k in reqs})
    t0 = clock()
    res = srv.collect_unmask(reps)
    t_unmask = clock() - t0
    alive = [k for k in names if k not in gone]
    exp = sum(weights[k] * vecs[k].astype(np.float64) for k in alive) / sum(
        weights[k] for k in alive
    )
    return {
        "mask_s": float(np.median(mask_times)),
        "server_sum_s": t_sum,
        "unmask_s": t_unmask,
        "upload_bytes": max(upload[k] for k in alive),
        "max_abs_err": float(np.abs(res.mean - exp).max()),
    }


# --------------------------------------------------------------------------------- flower
def bench_flower(n: int, m: int, dropouts: int, clock=time.perf_counter) -> dict:
    from flwr.common import ndarray_to_bytes
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        factor_combine,
        factor_extract,
        get_parameters_shape,
        parameters_addition,
        parameters_mod,
        parameters_multiply,
        parameters_subtraction,
    )
    from flwr.common.secure_aggregation.quantization import dequantize, quantize
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
    from flwr.supercore.primitives.asymmetric import (
        bytes_to_private_key,
        bytes_to_public_key,
        generate_key_pairs,
        private_key_to_bytes,
        public_key_to_bytes,
    )

    clipping_range, target_range, mod_range, max_weight = 8.0, 1 << 22, 1 << 32, W_MAX
    threshold = max(3, 2 * n // 3 + 1)
    names, vecs, weights = _vectors(n, m)
    nids = {k: i + 1 for i, k in enumerate(names)}
    keys = {}
    for k in names:
        sk1, pk1 = generate_key_pairs()
        keys[k] = (private_key_to_bytes(sk1), public_key_to_bytes(pk1))
    rd_seed = {k: os.urandom(32) for k in names}
    b_shares = {k: create_shares(rd_seed[k], threshold, n) for k in names}
    sk_shares = {k: create_shares(keys[k][0], threshold, n) for k in names}
    gone = set(names[:dropouts])
    alive = [k for k in names if k not in gone]

    mask_times, uploads, masked_all = [], [], []
    for k in alive:
        t0 = clock()
        ratio = weights[k] / max_weight
        q_ratio = round(ratio * target_range)
        dq_ratio = q_ratio / target_range
        parameters = parameters_multiply([vecs[k]], dq_ratio)
        quantized = quantize(parameters, clipping_range, target_range)
        quantized = factor_combine(q_ratio, quantized)
        dims = [a.shape for a in quantized]
        quantized = parameters_addition(quantized, pseudo_rand_gen(rd_seed[k], mod_range, dims))
        for j in names:  # every other node, as in the neighbourhood with num_shares = n
            if j == k:
                continue
            shared = generate_shared_key(
                bytes_to_private_key(keys[k][0]), bytes_to_public_key(keys[j][1])
            )
            pm = pseudo_rand_gen(shared, mod_range, dims)
            quantized = (
                parameters_addition(quantized, pm)
                if nids[k] > nids[j]
                else parameters_subtraction(quantized, pm)
            )
        quantized = parameters_mod(quantized, mod_range)
        mask_times.append(clock() - t0)
        uploads.append(sum(len(ndarray_to_bytes(a)) for a in quantized))
        masked_all.append(quantized)

    # server: sum of masked vectors (collect masked vectors stage)
    t0 = clock()
    masked = None
    for vec in masked_all:
        masked = vec if masked is None else parameters_addition(masked, vec)
    masked = parameters_mod(masked, mod_range)
    t_sum = clock() - t0
    # server: unmask stage
    t0 = clock()
    for k in names:
        holders = [i for i in range(n) if names[i] not in gone][:threshold]
        if k in alive:
            secret = combine_shares([b_shares[k][i] for i in holders])
            masked = parameters_subtraction(
                masked, pseudo_rand_gen(secret, mod_range, get_parameters_shape(masked))
            )
        else:
            secret = combine_shares([sk_shares[k][i] for i in holders])
            for j in alive:
                shared = generate_shared_key(
                    bytes_to_private_key(secret), bytes_to_public_key(keys[j][1])
                )
                pm = pseudo_rand_gen(shared, mod_range, get_parameters_shape(masked))
                masked = (
                    parameters_addition(masked, pm)
                    if nids[k] > nids[j]
                    else parameters_subtraction(masked, pm)
                )
    recon = parameters_mod(masked, mod_range)
    q_total_ratio, recon = factor_extract(recon)
    inv = target_range / q_total_ratio
    agg = dequantize(recon, clipping_range, target_range)
    offset = -(len(alive) - 1) * clipping_range
    for vec in agg:
        vec += offset
        vec *= inv
    t_unmask = clock() - t0
    exp = sum(weights[k] * vecs[k].astype(np.float64) for k in alive) / sum(
        weights[k] for k in alive
    )
    return {
        "mask_s": float(np.median(mask_times)),
        "server_sum_s": t_sum,
        "unmask_s": t_unmask,
        "upload_bytes": max(uploads),
        "max_abs_err": float(np.abs(agg[0] - exp).max()),
    }


def _fmt(x: float | None) -> str:
    return "n/a (t=n)" if x is None else f"{x:.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=7_000_000)
    ap.add_argument("--silos", default="3,5,10")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-flower", action="store_true", help="skip the Flower side")
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time (default) or this process's CPU time (on a loaded machine)",
    )
    args = ap.parse_args(argv)
    clock = CLOCKS[args.clock]
    m = args.params
    try:
        silos = [int(x) for x in args.silos.split(",")]
    except ValueError:
        ap.error(f"--silos must be comma-separated integers, got {args.silos!r}")
    if any(not 3 <= n <= 63 for n in silos) or m < 1:
        ap.error("each --silos value must be in [3, 63] (overflow headroom) and --params >= 1")
    bench_ours(3, min(m, 100_000), 0)  # warm-up: imports, first allocations
    rows = []
    for n in silos:
        for impl, fn in (("fedsilo", bench_ours), ("flower", bench_flower)):
            if impl == "flower" and args.no_flower:
                continue
            r0 = fn(n, m, 0, clock)
            # with n = 3 the threshold is 3: a dropout aborts the round (by design)
            r1 = fn(n, m, 1, clock) if n - 1 >= max(3, 2 * n // 3 + 1) else {"unmask_s": None}
            rows.append(
                {
                    "impl": impl,
                    "silos": n,
                    "params": m,
                    "mask_s": r0["mask_s"],
                    "unmask_s": r0["unmask_s"],
                    "unmask_1drop_s": r1["unmask_s"],
                    "server_sum_s": r0["server_sum_s"],
                    "upload_bytes": r0["upload_bytes"],
                    "upload_ratio": r0["upload_bytes"] / (4 * m),
                    "max_abs_err": r0["max_abs_err"],
                }
            )
    by = {(r["impl"], r["silos"]): r for r in rows}
    for r in rows:
        f = by.get(("flower", r["silos"]))
        if r["impl"] == "fedsilo" and f:
            r["mask_speedup_vs_flower"] = f["mask_s"] / r["mask_s"]
            r["unmask_speedup_vs_flower"] = f["unmask_s"] / r["unmask_s"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"{m:,} float32 parameters ({4 * m / 2**20:.1f} MiB); times in seconds, "
        f"median over silos; upload = bytes of all replies of one silo / float32 size"
    )
    hdr = (
        f"{'impl':8} {'n':>3} {'mask/silo':>10} {'unmask':>8} {'unmask-1drop':>13} "
        f"{'sum':>7} {'upload':>8} {'max err':>9} {'mask x':>7}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        sp = r.get("mask_speedup_vs_flower")
        print(
            f"{r['impl']:8} {r['silos']:>3} {r['mask_s']:>10.3f} {r['unmask_s']:>8.3f} "
            f"{_fmt(r['unmask_1drop_s']):>13} {r['server_sum_s']:>7.3f} "
            f"{r['upload_ratio']:>7.4f}x {r['max_abs_err']:>9.2e} "
            f"{(f'{sp:.1f}x' if sp else ''):>7}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
