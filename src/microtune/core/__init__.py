"""Core: errors, artifacts, hashing and the workspace; imports nothing else of microtune."""
