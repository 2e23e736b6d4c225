"""``python -m fastbench``: the command line (what ``torchrun -m fastbench`` runs in each process)."""
from fastbench.cli import main

main(prog_name="fastbench")
