"""Integrations with the frameworks concurrent_kv serves (LightZero's UniZero)."""
