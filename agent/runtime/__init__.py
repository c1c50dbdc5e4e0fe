"""The live runtime: the agent's streams, their window queues, the inference worker and the
event bus (`app`, `pipeline`, `worker`, `fanout`)."""
