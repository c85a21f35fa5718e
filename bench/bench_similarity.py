"""Similarity-index query latency at 10k and 100k vectors (width 2048).

Compares, in one run, on the same random vectors:
  index      normalised float32 matrix, one matrix product + argpartition (tl_app.insight.similarity)
  index16    float16 kept in memory (half the memory), converted block by block per query
             (on load, tl-app upcasts float16 files to float32 unless asked not to)
  batch32    32 queries in one call, latency per query
  vectorised the obvious numpy version: norms recomputed per query + a full argsort
  naive      a Python loop over vectors (cosine each) + a full sort
and checks that every method returns the same top-k.

    python bench/bench_similarity.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from common import emit

from tl_app.insight.similarity import SimilarityIndex, naive_top_k, top_k


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def vectorised_top_k(raw: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    sims = raw @ query / (np.linalg.norm(raw, axis=1) * np.linalg.norm(query))
    return np.argsort(-sims)[:k]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repeats and naive-loop queries")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    repeats = 5 if args.quick else 20
    naive_queries = 1 if args.quick else 3
    rng = np.random.default_rng(0)
    results = {"dim": args.dim, "k": args.k}
    for n in (10_000, 100_000):
        raw = rng.standard_normal((n, args.dim), dtype=np.float32)
        queries = rng.standard_normal((32, args.dim), dtype=np.float32)
        index = SimilarityIndex.from_features(raw, [{} for _ in range(n)], {})
        index16 = SimilarityIndex.from_features(raw, [{} for _ in range(n)], {}, dtype="float16")
        top_k(index.vectors, queries[:1], args.k)  # warm up BLAS

        fast = median_seconds(lambda: top_k(index.vectors, queries[:1], args.k), repeats)
        half = median_seconds(lambda: top_k(index16.vectors, queries[:1], args.k), max(2, repeats // 2))
        batch = median_seconds(lambda: top_k(index.vectors, queries, args.k), max(2, repeats // 2)) / len(queries)
        vectorised = median_seconds(lambda: vectorised_top_k(raw, queries[0], args.k), max(2, repeats // 2))
        naive = median_seconds(lambda: naive_top_k(raw, queries[0], args.k), naive_queries)

        expected = [i for i, _ in naive_top_k(raw, queries[0], args.k)]
        agree = (top_k(index.vectors, queries[:1], args.k)[0][0].tolist() == expected
                 and vectorised_top_k(raw, queries[0], args.k).tolist() == expected
                 and top_k(index16.vectors, queries[:1], args.k)[0][0].tolist() == expected)
        row = {
            "index_ms": round(fast * 1e3, 3), "index16_ms": round(half * 1e3, 3),
            "batch32_ms_per_query": round(batch * 1e3, 3), "vectorised_ms": round(vectorised * 1e3, 3),
            "naive_ms": round(naive * 1e3, 3), "speedup_vs_naive": round(naive / fast, 1),
            "speedup_vs_vectorised": round(vectorised / fast, 2), "same_top_k": agree,
            "index_mb": round(index.vectors.nbytes / 2**20, 1), "index16_mb": round(index16.vectors.nbytes / 2**20, 1),
        }
        results[f"n{n}"] = row
        print(f"N={n:>7} x {args.dim}: index {row['index_ms']:8.2f} ms/query | float16-in-memory {row['index16_ms']:8.2f} ms | "
              f"batch of 32 {row['batch32_ms_per_query']:7.2f} ms/query | vectorised+argsort "
              f"{row['vectorised_ms']:8.2f} ms | naive loop {row['naive_ms']:9.1f} ms")
        print(f"           speed-up vs naive loop {row['speedup_vs_naive']}x, vs vectorised+argsort "
              f"{row['speedup_vs_vectorised']}x; same top-{args.k}: {agree}; "
              f"memory {row['index_mb']} MB (float16 {row['index16_mb']} MB)")
        del raw, index, index16
    ratio = results["n100000"]["index_ms"] / results["n10000"]["index_ms"]
    results["latency_100k_over_10k"] = round(ratio, 2)
    print(f"latency grows {ratio:.1f}x for 10x the vectors")
    emit("similarity", results)


if __name__ == "__main__":
    main()
