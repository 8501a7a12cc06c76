"""``python -m benchmarks ...`` is ``emo-bench ...``."""

from .cli import main

raise SystemExit(main())
