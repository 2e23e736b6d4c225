"""Config lookup at launch time.

Until the tuned cache exists this serves the op's heuristic default. The full order (pinned, exact
hit, nearest bucket, bundled file, heuristic) lives here too once the autotune issue lands; callers
never change: ``config_for(spec, pass_name, problem)``.
"""
from __future__ import annotations

from .spec import Config, OpSpec, Problem


def config_for(spec: OpSpec, pass_name: str, problem: Problem) -> Config:
    return spec.heuristic(pass_name, problem)
