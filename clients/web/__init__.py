"""The live caption page (``static/``), served by the agent at ``/``.

Run: ``python -m clients.web --help``.
"""
