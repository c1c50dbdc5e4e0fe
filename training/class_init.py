"""A class-separating start for the Q-Former, before pre-training (``train --recipe nano-v2
--class-init STEPS``).

A fresh Q-Former hands the LLM tokens that look alike for a dog and a doorbell, and the first
pre-training steps are spent finding out that they differ. Here the trainable audio parts
(`ln_speech`, `ln_audio`, the window-level Q-Former, its query tokens and the projection)
are first trained on their own so that a clip's mean audio token points towards the LLM's own
input embedding of the clip's class name ("dog bark", "music", "glass breaking") and away from
the other classes': cross-entropy over the cosines to every class, as CLIP scores images
against captions. The class prototypes are the frozen LLM's embeddings, so the tokens separate
classes in the space the LLM reads, and no head is added or thrown away. Only clips without
speech take part (`clip_classes`): speech keeps what pre-training teaches it. Each step is the
Q-Former on cached encoder outputs: no LLM forward pass, so 300 steps take about 5 minutes.

The classes come from the corpus v2 clip specs (``corpus/meta.json``): what a clip was made of,
not what a model heard.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.salmonn import Salmonn
from training.train import EncoderCache, Sample, TrainingError, audio_rows_from_cache

logger = logging.getLogger(__name__)

#: Softmax temperature of the cosines (CLIP's learned one settles near 0.01; a fixed 0.07, its
#: starting value, is gentler on a few hundred steps).
TEMPERATURE = 0.07


def clip_classes(meta: Mapping[str, Any]) -> dict[str, str]:
    """The class name of each corpus v2 clip without speech in it, by clip id, from
    ``meta.json``'s specs: ``music`` for music alone, the sound's class (a real recording's
    ``cls``, a synthesizer's name with spaces) for a sound alone. Clips with speech (alone,
    or under music or a sound) are left out: pulled towards one class they lose what was
    said (measured: speech QA 53.6 -> 41.1 % with them, 48.3 % without; BENCHMARKS.md "Two
    warm starts on the short plan")."""
    classes: dict[str, str] = {}
    for spec in meta.get("specs", []):
        kind = spec.get("kind", "")
        if kind == "music":
            classes[spec["clip_id"]] = "music"
        elif kind == "sound" and spec.get("real"):
            classes[spec["clip_id"]] = str(spec["real"]["cls"]).replace("_", " ")
        elif kind == "sound" and spec.get("synth"):
            classes[spec["clip_id"]] = str(spec["synth"]).replace("_", " ")
    return classes


def class_prototypes(model: Salmonn, names: Sequence[str]) -> torch.Tensor:
    """Each name's mean input embedding in the LLM (its tokens after a space, as inside a
    sentence), unit length: (classes, llm_hidden)."""
    embed = model.llama_model.get_input_embeddings()
    rows = []
    with torch.no_grad():
        for name in names:
            ids = model.tokenizer(" " + name, add_special_tokens=False)["input_ids"]
            vectors = embed(torch.tensor(ids, dtype=torch.long, device=embed.weight.device))
            rows.append(vectors.float().mean(0))
    return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


def class_init(
    model: Salmonn,
    cache: EncoderCache,
    samples: Sequence[Sample],
    classes: Mapping[str, str],
    out_dir: str | Path,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 42,
) -> dict[str, Any]:
    """Train the audio parts (not LoRA) for ``steps`` steps so that each clip's mean audio
    token is nearest its class's prototype (`class_prototypes`), then save them to
    ``out_dir/last`` (a checkpoint directory). Each distinct clip of ``samples`` whose file
    stem is a key of ``classes`` takes part; classes are drawn evenly, so the 1,168 music
    clips do not drown the 70 of a sound.

    Returns:
        ``{"steps", "classes", "clips", "first_loss", "last_loss", "accuracy_before",
        "accuracy_after", "seconds"}``: the accuracies are nearest-prototype accuracy over
        (up to 512 of) the clips, before and after.

    Raises:
        TrainingError: no clip has a class, or fewer than two classes.
    """
    clips = {str(s.path): s for s in samples if s.path.stem in classes}
    chosen = sorted(clips.values(), key=lambda s: str(s.path))
    names = sorted({classes[s.path.stem] for s in chosen})
    if len(names) < 2:
        raise TrainingError(
            f"class init needs clips of two classes or more, got {len(chosen)} clips of "
            f"{names}: are the clips corpus v2's (their stems are meta.json's clip ids)?"
        )
    label = {name: i for i, name in enumerate(names)}
    targets = np.array([label[classes[s.path.stem]] for s in chosen])
    by_class = [np.flatnonzero(targets == i) for i in range(len(names))]
    prototypes = class_prototypes(model, names)
    params = [p for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    rng = np.random.default_rng([seed, 3])
    probe = rng.permutation(len(chosen))[:512]

    def logits_of(batch: Sequence[Sample]) -> torch.Tensor:
        rows = audio_rows_from_cache(model, cache.get(batch))
        pooled = torch.stack([r.float().mean(0) for r in rows])
        return torch.nn.functional.normalize(pooled, dim=-1) @ prototypes.T / TEMPERATURE

    def accuracy() -> float:
        hits = 0
        model.eval()
        with torch.no_grad():
            for start in range(0, probe.size, batch_size):
                index = probe[start : start + batch_size]
                predicted = logits_of([chosen[i] for i in index]).argmax(-1).numpy()
                hits += int((predicted == targets[index]).sum())
        model.train()
        return hits / max(1, probe.size)

    started = time.perf_counter()
    before = accuracy()
    losses: list[float] = []
    for _ in range(steps):
        picked_classes = rng.integers(0, len(names), size=batch_size)
        index = np.array([rng.choice(by_class[c]) for c in picked_classes])
        logits = logits_of([chosen[i] for i in index])
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(targets[index]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
    after = accuracy()
    model.eval()
    out = Path(out_dir)
    record = {
        "steps": steps,
        "classes": names,
        "clips": len(chosen),
        "first_loss": losses[0] if losses else None,
        "last_loss": float(np.mean(losses[-10:])) if losses else None,
        "accuracy_before": before,
        "accuracy_after": after,
        "seconds": time.perf_counter() - started,
    }
    model.save_checkpoint(out / "last", extra={"class_init": record})
    (out / "report.json").write_text(json.dumps(record, indent=1) + "\n")
    logger.info(
        "class init: %d steps over %d classes, nearest-prototype accuracy %.3f -> %.3f",
        steps, len(names), before, after,
    )  # fmt: skip
    return record
