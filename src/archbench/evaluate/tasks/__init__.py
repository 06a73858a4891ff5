"""archbench's local lm-evaluation-harness tasks: YAML files plus the functions they reference.

`TASKS_DIR` is the `include_path` for lm-eval's `TaskManager`; the tasks read only local files
(the BLiMP copy embedded in the package or the data mirror, and a prepared data directory).
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
