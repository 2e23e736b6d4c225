"""Triton kernels for the training step, one op per module (installed as ``fastbench.kernels``).

Keep this file free of imports and side effects: where the repository root is on ``sys.path``,
``import bitsandbytes`` imports it under the bare name ``kernels`` (see DESIGN.md).
"""
