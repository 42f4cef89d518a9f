"""Only for what pyproject.toml cannot say: the cffi modules compiled at install."""

from setuptools import setup

setup(cffi_modules=["native/kvm_build.py:ffibuilder", "native/virtq_build.py:ffibuilder",
                    "native/sigsys_build.py:ffibuilder"])
