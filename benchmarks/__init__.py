"""Benchmarks: reference models (``benchmarks.zoo``) and the fine-tune tasks that score placements
(``benchmarks.tasks``). Not installed with the package; run from a checkout."""
