"""``python -m world_probe OUTDIR``: each process joins its world and writes what it found (for the launch test)."""
import json
import os
import sys

from fastbench.distributed.world import barrier, current_world, is_main_process, process_group

with process_group() as world:
    assert current_world() == world
    with open(os.path.join(sys.argv[1], f"rank{world.rank}.json"), "w") as f:
        json.dump({"rank": world.rank, "world_size": world.world_size, "local_rank": world.local_rank,
                   "backend": world.backend, "device": str(world.device), "main": is_main_process()}, f)
    barrier(world)
