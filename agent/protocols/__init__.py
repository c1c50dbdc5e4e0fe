"""The agent's protocols, each a thin async context manager fed from the event bus: the
WebSocket server (`ws`), MQTT (`mqtt`, its `outbox` and embedded `broker`), Home Assistant
discovery (`homeassistant`) and the trigger rules (`rules`)."""
