"""Conditional DDPM pipeline for multi-label iCLEVR scenes (library; stages/ call it)."""
