"""The cluster roles over MQTT 5 shared subscriptions: the edge that captures and segments
(`edge`), the worker pool that answers (`worker`), and the messages between them
(`messages`). See docs/deployment.md."""
