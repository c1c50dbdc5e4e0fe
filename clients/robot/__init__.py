"""A robot driven by the agent's spoken commands over MQTT (``python -m clients.robot``)."""
