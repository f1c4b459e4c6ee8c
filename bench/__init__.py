"""cinesr.bench: measurements side by side (engines, ingest, demo seeds) and what every record carries
(`machine`). Each module with a `main` also runs as a script: `.venv/bin/python bench/<name>.py --help`."""
