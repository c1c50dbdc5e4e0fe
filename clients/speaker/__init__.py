"""Speaks the agent's answers with espeak-ng and tells the agent while it speaks.

Run: ``python -m clients.speaker --help``.
"""
