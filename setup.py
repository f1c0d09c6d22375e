"""Build hook: ship the top-level `recipes/` and `ds_configs/` inside the wheel as `rmkit/_resources/`.

The repository keeps both folders at its top (the design card); a wheel has no repository, so
build_py copies them into the built package. Editable installs skip the copy: there
rmkit.resources finds the repository folders, and edits to them apply without reinstalling.
Everything else about the project is declared in pyproject.toml.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
RESOURCES = {"recipes": "*.yaml", "ds_configs": "*.json"}  # repository folder -> files it ships
PACKAGED = os.path.join("rmkit", "_resources")  # inside the package; must match rmkit/resources.py


class BuildPyWithResources(build_py):
    """build_py that also copies the resource folders into build_lib/rmkit/_resources."""

    def _resource_files(self) -> list[tuple[str, str]]:
        """(source, destination in build_lib) for every shipped recipe and ZeRO config."""
        pairs = []
        for folder, pattern in RESOURCES.items():
            for src in sorted((HERE / folder).rglob(pattern)):
                rel = src.relative_to(HERE / folder)
                pairs.append((str(src), os.path.join(self.build_lib, PACKAGED, folder, *rel.parts)))
        return pairs

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return  # the editable install reads the repository folders
        # drop what an earlier build copied, so a recipe deleted from the repository leaves the wheel too
        shutil.rmtree(os.path.join(self.build_lib, PACKAGED), ignore_errors=True)
        for src, dst in self._resource_files():
            self.mkpath(os.path.dirname(dst))
            self.copy_file(src, dst, preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        return outputs if self.editable_mode else outputs + [dst for _, dst in self._resource_files()]


setup(cmdclass={"build_py": BuildPyWithResources})
