"""Instrument adapters: sources of STM frames that feed the stm-feedback daemon (simulated, files, Nanonis)."""
