"""``emo-bench``: measured quality and speed of the Emo optimizers against AdamW, Prodigy,
Schedule-Free AdamW and Lion on small offline workloads.

Run ``emo-bench quality``, ``emo-bench speed`` or ``emo-bench demo`` (also
``python -m emo_bench ...``); see :mod:`emo_bench.cli`. Nothing runs at import time.
"""

from emo_core.extras import require_extra

require_extra("emo-bench", "bench", "tqdm", "sklearn", "matplotlib")
