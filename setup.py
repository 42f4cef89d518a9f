"""Only for what pyproject.toml cannot say: the cffi modules compiled at install, and the
seccomp profiles installed as data (a wheel carries no top-level folder otherwise;
vmm/sandbox/profile.py finds them under <prefix>/share/stratovirt-py/)."""

from glob import glob

from setuptools import setup

setup(cffi_modules=["native/kvm_build.py:ffibuilder", "native/virtq_build.py:ffibuilder",
                    "native/sigsys_build.py:ffibuilder"],
      data_files=[("share/stratovirt-py/seccomp_profiles", sorted(glob("seccomp_profiles/*.json")))])
