"""Where clap keeps its files: the one reader of `CLAP_HOME` and of the per-user data and cache dirs.

    clap_home()   $CLAP_HOME, else the user data dir (~/.local/share/clap on Linux): indexes live here
    cache_dir()   $CLAP_HOME, else the user cache dir (~/.cache/clap on Linux): what can be recomputed

With CLAP_HOME set, everything clap writes goes under that one directory (tests and portable setups
rely on it); the caches keep their own subdirectory names there (`label-cache/`, …).
"""

from __future__ import annotations

import os
from pathlib import Path

APP_NAME = "clap"


def clap_home() -> Path:
    """The base directory for clap's data: `$CLAP_HOME` if set (and not empty), else the user data dir."""
    env = os.environ.get("CLAP_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir(APP_NAME))


def cache_dir() -> Path:
    """The base directory for caches: `$CLAP_HOME` if set (and not empty), else the user cache dir."""
    env = os.environ.get("CLAP_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir(APP_NAME))
