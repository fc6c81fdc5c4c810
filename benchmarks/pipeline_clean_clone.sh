#!/usr/bin/env bash
# The newcomer path, timed on a clean clone of this repo's HEAD:
#   1. `make pipeline` (creates .venv from requirements.lock, then runs every stage instance)
#   2. a second `dvc repro` (must change nothing)
#   3. `make retrain` on the unchanged data (must retrain nothing and keep the champion)
#   4. `dvc metrics show`
# Prints a markdown block for benchmarks/RESULTS.md. Usage: benchmarks/pipeline_clean_clone.sh [DIR]
set -euo pipefail
src=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
dest=${1:-$(mktemp -d)/bigmodel}
git clone -q "$src" "$dest"
cd "$dest"
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.1f}')"; }

t0=$(now); make pipeline > pipeline.log 2>&1; t1=$(now)
.venv/bin/dvc repro > repro2.log 2>&1; t2=$(now)
make retrain > retrain.log 2>&1; t3=$(now)
.venv/bin/dvc metrics show > metrics.txt 2>&1
grep -q "Data and pipelines are up to date" repro2.log || { echo "second dvc repro did work"; exit 1; }
grep -q "no change, champion kept" retrain.log || { echo "retrain on unchanged data did work"; exit 1; }

echo "### Clean clone: make pipeline ($(date -u +%F), commit $(git rev-parse --short HEAD))"
echo
echo "Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(python3 --version)"
echo
echo "| step | seconds |"
echo "|---|---:|"
echo "| make pipeline (install + $(.venv/bin/dvc stage list --name-only | wc -l) stage instances + champion gate) | $(secs "$t0" "$t1") |"
echo "| second dvc repro (no-op) | $(secs "$t1" "$t2") |"
echo "| make retrain, unchanged data (no change, champion kept) | $(secs "$t2" "$t3") |"
echo
echo "Stage times (from the report):"
echo
sed -n '/^| stage | status/,/^$/p' reports/pipeline_report.md
sed -n '/^## Champions/,/^## Where/p' reports/pipeline_report.md | sed '$d' | sed 's/^## /#### /'
echo "(dvc.lock of this run: $dest/dvc.lock)"
