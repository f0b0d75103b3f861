"""Receiving: the Storage/Verification SCP, durable ingest, peer checks, TLS, audit log."""
