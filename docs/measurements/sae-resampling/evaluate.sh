#!/usr/bin/env bash
# Dead latents and explained variance of each SAE of this comparison on 150,000 vectors of the store (training
# vectors included: a rare latent, e.g. one for a tumour pattern, looks dead on the few thousand held-out vectors).
# Usage: evaluate.sh STORE SAE... > evaluate.txt
set -euo pipefail
store=$1; shift
for sae in "$@"; do
    printf '%s\t' "$(basename "$sae")"
    seglens evaluate-sae --sae "$sae" --activations "$store" --sample 150000 2>&1 | tail -n 1
done
