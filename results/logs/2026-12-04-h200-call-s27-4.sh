# call 4: an A/A of the 4-bit offload step (main against itself) with tools/ab_trees.py's joules per step: does the
# energy counter work there, and is the energy's spread over turns narrower than the time's?
source .carry/setup.sh
export PYTORCH_ALLOC_CONF=expandable_segments:True
timeout 200 python3 tools/ab_trees.py . . --arm 4bit:offload --rounds 10 --steps 8 --seconds 110 --out $OUT/aa-energy.json > $OUT/aa-energy.log 2>&1; tail -16 $OUT/aa-energy.log | cut -c1-300; echo "[${SECONDS} s]"
