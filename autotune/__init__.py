"""Per-GPU launch configurations for fastbench's kernels (installed as ``fastbench.autotune``).

Keep this file free of imports and side effects (see ``fastbench/kernels/__init__.py``).
"""
