"""Opens the live caption page, which the agent serves at ``/`` (its files are package data of
``agent.protocols``: ``agent/protocols/web/``); this client only speaks HTTP to it.

Run: ``python -m clients.web --help``.
"""
