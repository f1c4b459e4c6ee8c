"""Model bundles shipped with CineSR (a package so that setuptools includes their files)."""
