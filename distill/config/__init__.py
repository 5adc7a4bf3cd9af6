"""The configuration: its schema (every key and type), the checks of shared settings, redaction."""
