"""The bundled tiny model (model.json + safetensors); load with cinesr.model.bundle.load_bundle()."""
