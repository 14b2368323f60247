"""Ray Serve applications; each module exposes an application builder named in a Serve config YAML."""

import sys as _sys
from pathlib import Path as _Path

# Run from a checkout or a job's working dir: import the in-tree aidc (see jobs/__init__.py).
_src = _Path(__file__).resolve().parent.parent / "platform"
if (_src / "aidc").is_dir() and str(_src) not in _sys.path:
    _sys.path.insert(0, str(_src))
