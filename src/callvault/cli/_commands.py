"""Imports every command module so that each registers its commands on the app."""

# Each line registers one group of commands; keep them sorted.
