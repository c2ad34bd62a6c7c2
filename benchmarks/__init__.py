"""
Side-by-side benchmarks of ``sb3_trpo_ext.TRPO`` against ``sb3_contrib.TRPO``.

- ``python -m benchmarks.speed``: end-to-end and update-step time, floor ratio, cost growth.
- ``python -m benchmarks.returns``: the returns campaign (implementation x environment x seed), resumable.
- ``python -m benchmarks.report``: figures and the README's benchmark tables from the result files.
"""
