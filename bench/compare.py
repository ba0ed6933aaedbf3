"""End-to-end benchmark: ``python bench/compare.py [options]``, the same as ``fastconv bench``.

Times a training step (batch 100) and inference over 1000 images for fastconv (CPU float32,
float16 inference), PyTorch CPU and the book-style NumPy net, in one interleaved run; prints
a markdown table and can write it into docs (``--out-md``) with a PNG chart (``--out-png``).
Run ``python bench/compare.py --help`` for the options.
"""

import sys
from pathlib import Path

# Run from a checkout without installing: import this checkout's fastconv.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastconv.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
