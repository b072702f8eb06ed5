"""Sourcebeam's pipelines: each module builds one job from options and shares transforms."""
