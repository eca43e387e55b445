"""`python -m pipeline.bench` (also how the memory and ensemble sections start their child processes)."""

import sys

from pipeline.bench.runner import main

sys.exit(main())
