"""python -m pipeline.evaluation.imitation: the same as `unlearnable imitate`."""

import sys

from pipeline.evaluation.imitation import main

sys.exit(main())
