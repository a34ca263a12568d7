"""Metadata lives in setup.cfg; this file only adds calib/ and export/ to built packages.

calib/ and export/ stay at the repository top (the product layout; examples pass them by path) as
the one editable copy. A wheel has no repository beside it, so building copies them into the package
as mimiq_deploy/configs/<folder>, where mimiq_deploy.config.config_dir finds them through
importlib.resources. Package data must sit inside the package folder, and a symlink there is not
dependable (Windows checkouts, tools that keep links), hence the copy at build time.
"""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
CONFIG_FILES = {"calib": ["*.toml"], "export": ["*.toml", "templates/*.pbtxt"]}


class BuildPyWithConfigs(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the repository's folders themselves
        for folder, patterns in CONFIG_FILES.items():
            for pattern in patterns:
                for src in sorted((HERE / folder).glob(pattern)):
                    dst = Path(self.build_lib, "mimiq_deploy", "configs", src.relative_to(HERE))
                    self.mkpath(str(dst.parent))
                    self.copy_file(str(src), str(dst), preserve_mode=False)


setup(cmdclass={"build_py": BuildPyWithConfigs})
