"""Speaks the agent's answers (Piper's natural voice when installed, espeak-ng otherwise) and
tells the agent while it speaks.

Run: ``python -m clients.speaker --help``.
"""
