"""tclora: cluster a multi-task corpus, train one LoRI adapter per cluster, merge them with TC-LoRA's joint CP.

This package holds the algorithms and never imports Ray; ``pipelines`` distributes them.
"""

__version__ = "0.1.0"
