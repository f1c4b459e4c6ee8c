"""cinesr.service"""
