"""Only for what pyproject.toml cannot say: the cffi modules compiled at install, the
zygote's stand-in program (native/standin.c, an executable inside the package), and the
seccomp profiles installed as data (a wheel carries no top-level folder otherwise;
vmm/sandbox/profile.py finds them under <prefix>/share/stratovirt-py/)."""

import os
from glob import glob

from setuptools import setup
from setuptools.command.build_ext import build_ext

STANDIN = ("native/standin.c", "vmm/zygote", "stratovirt-standin")


class BuildExtAndStandin(build_ext):
    def run(self):
        super().run()
        source, package_dir, name = STANDIN
        objects = self.compiler.compile([source], output_dir=self.build_temp,
                                        extra_postargs=["-O2", "-Wall"])
        target = package_dir if self.inplace else os.path.join(self.build_lib, package_dir)
        self.compiler.link_executable(objects, name, output_dir=target)


setup(cffi_modules=["native/kvm_build.py:ffibuilder", "native/virtq_build.py:ffibuilder",
                    "native/sigsys_build.py:ffibuilder"],
      cmdclass={"build_ext": BuildExtAndStandin},
      data_files=[("share/stratovirt-py/seccomp_profiles", sorted(glob("seccomp_profiles/*.json")))])
