"""Training recipes (YAML) for cinesr.model.train; a package so that setuptools ships them."""
