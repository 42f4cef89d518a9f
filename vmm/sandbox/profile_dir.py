"""Where the seccomp profiles are, and which roles they give: all that installing a
cached filter needs to know of them (seccomp.py), without parsing one (profile.py)."""

import os
import sys
from pathlib import Path


def _profile_dir() -> Path:
    """$STRATOVIRT_SECCOMP_PROFILES, else the source tree's seccomp_profiles/ (editable
    installs), else the copy a wheel installs under <prefix>/share/stratovirt-py/."""
    if "STRATOVIRT_SECCOMP_PROFILES" in os.environ:
        return Path(os.environ["STRATOVIRT_SECCOMP_PROFILES"])
    source = Path(__file__).resolve().parents[2] / "seccomp_profiles"
    if source.is_dir():
        return source
    import sysconfig
    installed = [Path(prefix) / "share" / "stratovirt-py" / "seccomp_profiles" for prefix in
                 (sysconfig.get_path("data"), sys.prefix, "/usr/local")]
    return next((path for path in installed if path.is_dir()), installed[0])


PROFILE_DIR = _profile_dir()


def roles() -> list[str]:
    return sorted(name[:-len(".json")] for name in os.listdir(PROFILE_DIR)
                  if name.endswith(".json"))
