"""Entrypoints for `ray job submit --working-dir . -- python -m jobs.<job> --config ...`.

A submitted job runs from an unpacked copy of the working dir. Put that copy's `platform/` first
on sys.path so the job runs the aidc it was submitted with, not an older installed one; aidc's
runtime then ships the same package to every Ray worker (py_modules).
"""

import sys as _sys
from pathlib import Path as _Path

_src = _Path(__file__).resolve().parent.parent / "platform"
if (_src / "aidc").is_dir() and str(_src) not in _sys.path:
    _sys.path.insert(0, str(_src))
