"""Instrument adapters: sources of STM frames for the stm-feedback daemon (simulated, files, Nanonis)."""
