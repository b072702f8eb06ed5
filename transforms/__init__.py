"""Sourcebeam's Beam transforms, each wrapping plain-Python business logic."""
