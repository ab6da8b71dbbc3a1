"""Speed benchmarks: each comparison is timed interleaved against its baseline in the same run.

Needs the ``bench`` extra (``pip install 'moelora[bench]'``: the training stack and PEFT, the baseline).
"""

from ..extras import require_extra

require_extra("bench", "moelora.bench (moelora bench)")
