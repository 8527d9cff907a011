"""A synthetic driving world written in the exact nuScenes format (the embedded default dataset).

``write_world(out, ...)`` writes a dataroot the nuscenes-devkit loads like v1.0-mini; see
datasets/synthetic/README.md for what the world contains and how it differs from real nuScenes.
"""
from drivejepa.data.synth.writer import DEFAULT_IMAGE_SIZE, SYNTH_VERSION, read_summary, write_world

__all__ = ["DEFAULT_IMAGE_SIZE", "SYNTH_VERSION", "read_summary", "write_world"]
