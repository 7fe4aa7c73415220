"""Benchmarks and the soak: scripts that print numbers and write JSON, beside the pipeline packages.

| module          | make target                | measures                                                        |
|-----------------|----------------------------|-----------------------------------------------------------------|
| bench.prepare   | make bench-data            | the data stage's interactions/s and peak memory vs the reference ETL |
| bench.train     | make bench-train           | the reference protocol, several seeds (+ Transformers4Rec side by side) |
| bench.quality   | make bench-quality, make bench-quality-nowplaying | model vs baselines on real logs (DIGINETICA, NowPlaying) |
| bench.serving   | make bench-serving         | perf_analyzer against the ensemble, the floor and in-process    |
| bench.soak      | make soak                  | bounded load: failures, latency and server memory growth        |

Each runs as `python -m bench.<module> --help`. What two of them share is in
bench.common. Tests never import this package (a test that needs a benchmark
runs its CLI; reusable pieces live in the pipeline packages, e.g. clients.load).
"""
