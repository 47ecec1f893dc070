"""Packaging hook (the metadata is in setup.cfg): the browser UI's files, kept
in the top-level ``web/`` folder, are shipped inside the package as
``llamaswap/web`` (``llamaswap/server/ui.py`` finds them there once
installed, and in ``web/`` in a checkout).  Plain files, no build step."""

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithWeb(build_py):
    def run(self):
        super().run()
        source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")
        if os.path.isdir(source) and not self.dry_run:
            target = os.path.join(self.build_lib, "llamaswap", "web")
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target, ignore=shutil.ignore_patterns(".*", "__pycache__"))


setup(cmdclass={"build_py": BuildPyWithWeb})
