"""callvault: keep every call recording of Yeastar PBXs (S-Series, Cloud PBX, P-Series),
safe and findable."""

__version__ = "0.1.0"
