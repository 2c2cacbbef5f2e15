"""Test helpers for fleetsync end-to-end tests: real processes, real sockets, real files."""
