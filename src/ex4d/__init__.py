"""ex4d: extreme-viewpoint 4D video synthesis through a depth watertight mesh (EX-4D)."""

__version__ = "0.1.0"
