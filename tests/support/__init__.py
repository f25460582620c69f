"""Helpers shared by test modules (plain modules, no tests; no test module imports another);
fixtures are in conftest.py."""
