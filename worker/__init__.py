"""cinesr.worker"""
