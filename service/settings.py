"""Settings as the service sees them; defined in cinesr.worker.settings so workers read the same ones."""

from cinesr.worker.settings import Backend, Settings, get_settings, load_settings

__all__ = ["Backend", "Settings", "get_settings", "load_settings"]
