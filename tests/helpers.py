"""Small helpers shared by test modules in several folders."""
from __future__ import annotations

import os
import sys
from pathlib import Path


def installed_script() -> Path:
    """The `clipposter` console script that installing the package wrote next to this interpreter."""
    script = Path(sys.executable).parent / ("clipposter.exe" if os.name == "nt" else "clipposter")
    assert script.is_file(), f"{script} is missing: install the package (pip install -e .) to get the console script"
    return script
