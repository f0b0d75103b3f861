"""Sending results: a persistent outbox drained by a C-STORE SCU with retries."""
