"""cinesr.model"""
