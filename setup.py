"""Maps the top-level folders model/, worker/, service/, bench/ to cinesr.model, cinesr.worker, cinesr.service,
cinesr.bench."""

from setuptools import find_packages, setup

FOLDERS = ("model", "worker", "service", "bench")


def _packages() -> list[str]:
    found = []
    for folder in FOLDERS:
        found.append(f"cinesr.{folder}")
        found += [f"cinesr.{folder}.{sub}" for sub in find_packages(folder)]
    return found


setup(packages=_packages())
