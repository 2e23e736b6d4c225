"""The fused training path: per-object patching of HF decoder models (no import-time side effects)."""
