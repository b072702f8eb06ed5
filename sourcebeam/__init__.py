"""Sourcebeam: event sourcing on Apache Beam."""
