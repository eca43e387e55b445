"""python -m pipeline.evaluation.report: the same as `unlearnable report`."""

import sys

from pipeline.evaluation.report import main

sys.exit(main())
