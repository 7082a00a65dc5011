"""The reliability suite's matrix: which fault cases exist, which tests prove them, and the
pytest plugin that records their outcomes and writes docs/reliability.md (see plugin.py)."""
