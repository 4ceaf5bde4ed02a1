"""Test support that ships with the package: the metalcompute stand-in (fake_metalcompute)."""
