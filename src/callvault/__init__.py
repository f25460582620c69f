"""callvault: keep every call recording of a Yeastar S-Series PBX, safe and findable."""

__version__ = "0.1.0"
