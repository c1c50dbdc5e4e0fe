"""The audio every model here takes: mono float32 in [-1, 1] at one sample rate."""

SAMPLE_RATE_HZ = 16_000
"""Whisper's and BEATs' input rate (SALMONN feeds both the same clip). `streaming.pcm` holds the
pipeline's copy of this value: ``model/`` and ``streaming/`` import nothing of each other."""
