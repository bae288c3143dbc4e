"""Thin command-line entry points: parse a config, connect to Ray, call one pipeline function.

Whatever directory a job is started from, it imports this project's packages: Python puts the working directory
first on `sys.path`, where a folder named `model/` (a checkpoint, say), `pipeline/` or `jobs/` would otherwise
shadow them, here and, through Ray, in every worker (`jobs._config.connect_ray` gives the workers this path too).
"""

import os as _os
import sys as _sys

PROJECT_ROOT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _sys.path[:1] != [PROJECT_ROOT]:
    _sys.path.insert(0, PROJECT_ROOT)
