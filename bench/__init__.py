"""Benchmarks run by `salmonn-live bench` (see `bench.cli`)."""

#: The test preset's Whisper has no tokenizer, so its benchmarks keep the LLM on every task.
LLM_ONLY_MODELS = frozenset({"tiny-random"})


def answer_paths(model: str, transcript: str | None, command: str | None) -> dict[str, str]:
    """`[model]` keys for who answers transcripts and commands: the given ones, else `run`'s
    defaults, except for `LLM_ONLY_MODELS`, where the LLM answers (the benchmark then measures
    the agent, not Whisper)."""
    fallback = "llm" if model in LLM_ONLY_MODELS else "whisper"
    return {"transcript": transcript or fallback, "command": command or fallback}
