# call: the LoRA rank-r terms folded into the base products' reduction, against the products as run now (probe)
source .carry/setup.sh
python3 results/logs/2026-12-03-h200-lora-fold-probe.py 2>&1 | tee $OUT/lora-fold-probe.log
