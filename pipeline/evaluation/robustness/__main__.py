"""`python -m pipeline.evaluation.robustness`."""

import sys

from pipeline.evaluation.robustness.runner import main

sys.exit(main())
