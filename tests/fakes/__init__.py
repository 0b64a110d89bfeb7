"""Test doubles for the layers above the engine (never for testing an engine itself)."""
