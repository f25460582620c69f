"""Imports every command module so that each registers its commands on the app."""

# Each line registers one group of commands; keep them sorted.
from callvault.cli import _archive_cmds  # noqa: F401
from callvault.cli import _fetch  # noqa: F401
from callvault.cli import _serve  # noqa: F401
from callvault.cli import _simulate  # noqa: F401
from callvault.cli import _web  # noqa: F401
