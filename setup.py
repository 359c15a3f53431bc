"""Package layout: models/ and experiments/ are top-level folders in the repository
(so the layout shows the architecture) and install as jaxinterp.models and
jaxinterp.experiments. Everything else is in pyproject.toml."""
from setuptools import find_packages, setup

ROOTS = {"jaxinterp": "jaxinterp", "jaxinterp.models": "models", "jaxinterp.experiments": "experiments"}
packages = []
for name, folder in ROOTS.items():
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]
setup(packages=packages, package_dir=ROOTS)
