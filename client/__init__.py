"""The agent: runs on every host; checks, fetches, verifies, applies and reports."""
