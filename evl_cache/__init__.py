"""evl-cache: frozen-CLIP video recognition (EVL) trained from a Zarr cache of backbone features.

Importing the package makes any Ray started later bind to loopback only and keeps usage stats off:
Ray reads these variables at import time, so they must be set before `import ray` anywhere.
"""

import os as _os

_os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
_os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

__version__ = "0.1.0"
