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


# The files that take longest (seconds on a 2-core AVX2 EPYC, `--durations`), run first. pytest-xdist's
# --dist loadfile hands out whole files in collection order (`make test` turns off its reordering by
# test count, which put the README's 6-minute walk last, one worker idle while it ran): starting the
# long files first leaves only short ones for the end, where the two workers finish together.
# From a CI run's --durations=0: 296, 171, 155, 150 and 131 s.
LONG_FILES = (
    "test_readme.py",
    "test_cli_contract.py",
    "test_run_folder.py",
    "test_faults_cli.py",
    "test_reproduce.py",
)


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = item.path.name
        return LONG_FILES.index(name) if name in LONG_FILES else len(LONG_FILES)

    items.sort(key=rank)  # stable: each file keeps its tests' order, the rest their collection order
