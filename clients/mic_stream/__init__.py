"""Streams a microphone, a file or stdin to the agent's ``/audio`` endpoint.

Run: ``python -m clients.mic_stream --help``.
"""
