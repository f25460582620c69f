"""Helpers shared by test modules (plain modules: no tests here); fixtures are in conftest."""
