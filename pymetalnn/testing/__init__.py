"""Test support that ships with the package: the metalcompute stand-in (fake_metalcompute), torch
peers of the training benchmarks (torch_peer) and torch reference models (torch_models)."""
