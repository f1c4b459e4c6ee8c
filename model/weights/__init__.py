"""Vendored model weights shipped as package data (see README.md in this folder)."""
