"""Suite-wide settings, shared with every process of the session (xdist workers, CLI subprocesses)
through the environment:

- the machine's calibration (vitkit.fast.machine) is cached in a folder of the session's own, never
  the user's cache;
- every process takes fixed figures in which fp32 measured fastest (VITKIT_CALIBRATION=FILE), so
  "auto" means fp32 on every CPU and a command's answers compare with the Python API's to float
  rounding. The tests of the measured choices (test_calibration.py) set their own figures, the bf16
  paths included, or measure.
"""

import json
import os
import tempfile
from pathlib import Path

_session = Path(tempfile.mkdtemp(prefix="vitkit-test-"))
if not os.environ.get("VITKIT_CACHE_DIR"):
    os.environ["VITKIT_CACHE_DIR"] = str(_session / "cache")
if not os.environ.get("VITKIT_CALIBRATION"):
    figures = {
        "machine": "tests: fp32 fastest",
        "gemm": {"fp32": 200.0, "bf16": 100.0, "bf16_fp32_units": 150.0},
    }
    (_session / "fp32-fastest.json").write_text(json.dumps(figures))
    os.environ["VITKIT_CALIBRATION"] = str(_session / "fp32-fastest.json")
