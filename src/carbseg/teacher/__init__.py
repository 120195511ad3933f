"""The teacher: turns image-level labels into dense pseudo-masks (CLIP, or the simulated instrument)."""
