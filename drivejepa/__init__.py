"""drivejepa: a multimodal JEPA world model for autonomous driving on nuScenes."""
__version__ = "0.1.0"
