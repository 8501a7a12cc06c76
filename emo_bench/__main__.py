"""``python -m emo_bench ...`` is ``emo-bench ...``."""

from .cli import main

raise SystemExit(main())
