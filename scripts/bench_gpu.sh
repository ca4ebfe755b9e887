#!/usr/bin/env bash
# ds4jax on one GPU: the `bench` preset and a larger model that fills much of the card, each
# single-process and as a 1-worker split on the same machine (both processes share the GPU),
# prefill/decode tok/s, and the decode step against its floor (weight bytes / measured HBM
# bandwidth); then the Flash-dims fixture's decode tok/s at B = 1 and 8 and its fraction of the
# HBM floor, with the Pallas kernels and with the jax.numpy path (scripts/bench_model.py
# --floor). Needs a venv with jax[cuda] and ds4jax installed (pip install -e .).
#
#   bash scripts/bench_gpu.sh            # results under $OUT (default /tmp/ds4jax-gpu-bench)
#   bash scripts/bench_gpu.sh --devices=4   # also a stage spanning 1..4 GPUs (issue 14)
#
# Knobs (environment): OUT, LARGE_LAYERS (4), LARGE_EXPERTS (32), FLASH_LAYERS (4),
# DECODE (64), LENS (512,4096), DEVICES (1; the same as --devices=N).
# With --devices=N (N > 1) the bench preset and the large model are also timed as one stage
# over 1, 2, ..., N GPUs (powers of two up to N; the routed experts sharded over them, see
# docs/design.md §12) by scripts/bench_model.py --devices.
# The large model has Flash's attention shapes (d_model 4096, 64 heads of 512) and 32 experts
# of 2048: about 0.95e9 parameters per layer, 3.8 GB per layer as float32 on the device. The
# default 4 layers (~15 GB) keeps generation + two loads inside a 15-minute device slot;
# LARGE_LAYERS=16 fills an 80 GB card (both split processes share it).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICES=${DEVICES:-1}
for arg in "$@"; do
  case "$arg" in
    --devices=*) DEVICES=${arg#--devices=} ;;
    *) echo "error: unknown argument $arg (expected --devices=N)" >&2; exit 2 ;;
  esac
done
if ! [[ "$DEVICES" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: --devices must be a positive integer, got $DEVICES" >&2; exit 2
fi
OUT=${OUT:-/tmp/ds4jax-gpu-bench}
LARGE_LAYERS=${LARGE_LAYERS:-4}
LARGE_EXPERTS=${LARGE_EXPERTS:-32}
DECODE=${DECODE:-64}
LENS=${LENS:-512,4096}
mkdir -p "$OUT"
# Two processes share one GPU in the split: no up-front grab of 75% of its memory each.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import jax; d = jax.devices()[0]; assert d.platform == 'gpu', d; print(d.device_kind)"
GBS=$(python -m ds4jax.bench.gpu bandwidth)
echo "measured device copy bandwidth: $GBS GB/s" | tee -a "$OUT/gpu.txt"

python scripts/bench.py --preset=bench --prompt_lens="$LENS" --decode_tokens="$DECODE" \
  --workers=1 --skip_hf --out_json="$OUT/bench.json" --out_md="$OUT/bench.md"

LARGE="$OUT/large-${LARGE_LAYERS}l-${LARGE_EXPERTS}e.gguf"
if [ ! -f "$LARGE" ]; then
  python - "$LARGE" "$LARGE_LAYERS" "$LARGE_EXPERTS" <<'EOF'
import sys
from ds4jax.gguf.tiny import make_tiny_gguf
path, n_layers, n_experts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ratios = tuple((0, 0) + (4, 128) * n_layers)[:n_layers]
# Q8_0 experts: gguf-py dequantises them fast (IQ2 would dominate the load time).
make_tiny_gguf(path, "bench", experts="q8", n_layers=n_layers, d_model=4096, vocab_size=32768,
               n_heads=64, head_dim=512, rope_dim=64, q_lora_rank=1024, o_groups=8,
               o_lora_rank=1024, n_experts=n_experts, n_experts_used=6, expert_ff=2048,
               n_hash_layers=2, compress_ratios=ratios, index_heads=64, index_head_dim=128,
               index_topk=512, context_length=8192)
print(path)
EOF
fi
python scripts/bench.py --gguf="$LARGE" --prompt_lens="$LENS" --decode_tokens="$DECODE" \
  --workers=1 --skip_hf --out_json="$OUT/large.json" --out_md="$OUT/large.md"

# The Flash-dims fixture (issue 12): the real Flash dims, schedule and q2 mix, FLASH_LAYERS
# layers (~2.4 GB each, packed; a 64 GiB disk holds ~20), run packed, single process.
FLASH_LAYERS=${FLASH_LAYERS:-4}
FLASH="$OUT/flash-${FLASH_LAYERS}l.gguf"
[ -f "$FLASH" ] || python scripts/make_tiny_gguf.py --preset=flash --n_layers="$FLASH_LAYERS" \
  --out="$FLASH"
python scripts/bench.py --gguf="$FLASH" --prompt_lens=512 --decode_tokens="$DECODE" \
  --workers=0 --skip_hf --out_json="$OUT/flash.json" --out_md="$OUT/flash.md"

python -m ds4jax.bench.gpu floor "$OUT/bench.json" "$OUT/large.json" "$OUT/flash.json" \
  --gbs="$GBS" | tee "$OUT/floor.md"

# The Flash-dims fixture's decode against its HBM floor through the packed kernels (issue 21,
# docs/design.md §8.1: Pallas Triton here): ms/token, tok/s at B = 1 and B = 8, and floor /
# measured (the bytes a token reads over the rate XLA reads a 2 GiB array on this GPU), per
# activation mode; then the jax.numpy path (DS4JAX_ACCEL_KERNELS=xla) on the same fixture.
python scripts/bench_model.py --nohf --floor="$FLASH" --batches=1,8 --activations=exact,q8 \
  --decode="$DECODE" | tee "$OUT/flash-floor.md"
DS4JAX_ACCEL_KERNELS=xla python scripts/bench_model.py --nohf --floor="$FLASH" --batches=1,8 \
  --decode="$DECODE" | tee "$OUT/flash-floor-xla.md"

if [ "$DEVICES" -gt 1 ]; then
  # One stage over 1, 2, 4, ... DEVICES GPUs: the routed experts sharded (expert parallelism).
  COUNTS=1; n=2
  while [ "$n" -le "$DEVICES" ]; do COUNTS="$COUNTS,$n"; n=$((n * 2)); done
  [[ ",$COUNTS," == *",$DEVICES,"* ]] || COUNTS="$COUNTS,$DEVICES"
  python -c "import jax, sys; n = len(jax.devices()); sys.exit(0 if n >= $DEVICES else
    f'error: --devices=$DEVICES but only {n} GPU(s)')"
  python scripts/bench_model.py --nohf --devices="$COUNTS" --prompt=512 --decode="$DECODE" \
    | tee "$OUT/devices-bench.md"
  python scripts/bench_model.py --nohf --devices="$COUNTS" --gguf="$LARGE" --prompt=512 \
    --decode="$DECODE" | tee "$OUT/devices-large.md"
fi
echo "results in $OUT"
