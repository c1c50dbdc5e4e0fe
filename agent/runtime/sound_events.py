"""Sound-event lifecycles: per-patch label-group scores in, start / update / end decisions out.

A `SoundTracker` follows one stream. It is fed the tagger's label-group scores of each 0.96 s
patch (or of a pooled window) with its place on the stream clock, and returns what happened, in
the manner of websockets' Sans-I/O ``Protocol``: plain calls in, plain values out, no clock, no
I/O and no callbacks. The caller turns the decisions into events.

The lifecycle of one occurrence of a label group (one id, ``<stream>:sound:<n>``):

- **start**: the group's score reached its on-threshold on `SoundTrackerConfig.min_patches`
  patches, spanning at least `SoundTrackerConfig.min_duration_s` (patches between the off- and
  the on-threshold keep a candidate alive without counting; one below the off-threshold drops
  it).
- **update**: only for sustained groups (alarms, music, appliances: `DEFAULT_SUSTAINED_GROUPS`
  or the configuration), while the group is still heard, at most once every
  `SoundTrackerConfig.update_every_s` of stream time.
- **end**: the group has not been heard (its score stayed below the off-threshold, which is
  the on-threshold times `SoundTrackerConfig.off_ratio`: hysteresis, so a score hovering at the
  threshold does not flap) for `SoundTrackerConfig.end_after_s` of stream time, or `close`
  was called at the end of the stream. A short sound (a bark, a knock) gets a start and an end.

"Not heard for ``end_after_s``" is judged on the tracker's clock, which only the caller moves:
`observe` moves it to the patch's start, `advance` to a time the caller names. Audio that was
never tagged (the background between duty-cycle patches) therefore counts as unheard once the
clock passes it: tag the background at least every ``end_after_s`` to keep a sustained sound
on.

Decisions come in the order they happen: within one call, occurrences the clock move ended
first (oldest first), then the groups of the new patch in the order of its scores mapping.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from agent.config import SoundsConfig

SoundState = Literal["start", "update", "end"]

#: Groups of `model.sound_tagger.LABEL_GROUPS` that go on for a while and get `update`s: an
#: alarm that keeps ringing, music, a running appliance or engine, water, weather.
DEFAULT_SUSTAINED_GROUPS: frozenset[str] = frozenset(
    {
        "smoke_alarm",
        "alarm",
        "siren",
        "music",
        "tv_radio",
        "appliance",
        "engine",
        "vehicle",
        "aircraft",
        "train",
        "water",
        "rain",
        "wind",
        "thunderstorm",
        "fire",
        "crowd",
        "baby",
        "crying",
        "snoring",
        "telephone",
        "clock",
    }
)

#: Groups no sound event is made for by default: speech has transcripts, and the rest is the
#: room itself.
DEFAULT_IGNORED_GROUPS: frozenset[str] = frozenset({"speech", "silence", "room", "noise"})


#: On-thresholds of groups that real voices set off at 0.5 (KLettres' letters heard as
#: "Animal", "Insect"), chosen on the dev speech only (agent/config.py ``min_patches``);
#: `tracker_config` uses them for groups without a ``[sounds.groups]`` threshold (never below
#: ``sounds.threshold``).
DEFAULT_THRESHOLDS: Mapping[str, float] = {"animal": 0.7, "insect": 0.7}


@dataclass(frozen=True)
class SoundTrackerConfig:
    """When a label group's scores make a sound event (`agent.config.SoundsConfig` builds one).

    Attributes:
        threshold: On-threshold of every group without its own (a score in 0..1).
        thresholds: Group -> its own on-threshold.
        off_ratio: The off-threshold is the on-threshold times this (0 < ratio <= 1; 1: no
            hysteresis).
        min_patches: Patches at or above the on-threshold before a start.
        min_duration_s: Stream seconds from the first such patch's start to the last one's end
            before a start (0: one patch is enough).
        end_after_s: Stream seconds a group must go unheard before its occurrence ends.
        update_every_s: Least stream seconds between a sustained occurrence's decisions.
        max_labels: AudioSet classes listed in a decision's labels (best first).
        sustained: Groups that get updates.
        ignore: Groups that never make an occurrence (their scores are skipped).
        group_classes: Group -> its AudioSet class names; when given, a decision lists only
            its own group's classes among the labels it was fed. None: every label fed.
        default_thresholds: Group -> on-threshold for groups not in ``thresholds``, never
            below ``threshold`` (`tracker_config` passes `DEFAULT_THRESHOLDS`).
    """

    threshold: float = 0.5
    thresholds: Mapping[str, float] = field(default_factory=dict)
    off_ratio: float = 0.6
    min_patches: int = 1
    min_duration_s: float = 0.0
    end_after_s: float = 5.0
    update_every_s: float = 5.0
    max_labels: int = 3
    sustained: Collection[str] = DEFAULT_SUSTAINED_GROUPS
    ignore: Collection[str] = DEFAULT_IGNORED_GROUPS
    group_classes: Mapping[str, Collection[str]] | None = None
    default_thresholds: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checked = [*self.thresholds.items(), *self.default_thresholds.items()]
        for name, value in [("threshold", self.threshold), *checked]:
            if not (_is_number(value) and 0 < value <= 1):
                raise ValueError(f"threshold of {name!r}: expected 0 < t <= 1, got {value!r}")
        if not 0 < self.off_ratio <= 1:
            raise ValueError(f"off_ratio: expected 0 < ratio <= 1, got {self.off_ratio!r}")
        if self.min_patches < 1:
            raise ValueError(f"min_patches: expected >= 1, got {self.min_patches!r}")
        for name in ("min_duration_s", "end_after_s", "update_every_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
        if self.max_labels < 0:
            raise ValueError(f"max_labels: expected >= 0, got {self.max_labels!r}")

    def on_threshold(self, group: str) -> float:
        """The score at which ``group`` is heard when it was not."""
        if group in self.thresholds:
            return self.thresholds[group]
        return max(self.threshold, self.default_thresholds.get(group, 0.0))

    def off_threshold(self, group: str) -> float:
        """The score below which ``group`` is no longer heard (hysteresis)."""
        return self.on_threshold(group) * self.off_ratio


@dataclass(frozen=True)
class SoundDecision:
    """One step of an occurrence's lifecycle.

    Attributes:
        state: ``start``, ``update`` or ``end``.
        group: The label group (``smoke_alarm``).
        occurrence_id: ``<stream>:sound:<n>``, the same from start to end.
        score: The group's best score so far in this occurrence (0..1).
        labels: The best AudioSet classes so far, as (display name, best score), best first.
        start_s: Stream seconds: the start of the first patch that heard it.
        end_s: Stream seconds: the end of the last patch that heard it.
        sustained: Whether the group gets updates (so a start is followed by updates).
    """

    state: SoundState
    group: str
    occurrence_id: str
    score: float
    labels: tuple[tuple[str, float], ...]
    start_s: float
    end_s: float
    sustained: bool


@dataclass
class _Run:
    """A candidate (before its start) or an occurrence (after it)."""

    start_s: float
    heard_until_s: float  # end of the last patch at or above the off-threshold
    score: float
    labels: dict[str, float]
    patches: int = 0  # patches at or above the on-threshold
    occurrence_id: str | None = None  # set at the start
    last_decision_s: float = 0.0  # end_s of the last start or update


class SoundTracker:
    """Start / update / end decisions for the label groups of one stream (module docstring).

    Args:
        stream: The stream id (occurrence ids are ``<stream>:sound:<n>``, n from 0).
        config: Thresholds and timings.
    """

    def __init__(self, stream: str, config: SoundTrackerConfig | None = None) -> None:
        self.stream = stream
        self.config = config or SoundTrackerConfig()
        self._numbers = itertools.count()
        self._runs: dict[str, _Run] = {}
        self._clock_s = -math.inf

    @property
    def clock_s(self) -> float:
        """The tracker's stream time: the latest `observe` start or `advance` time."""
        return self._clock_s

    @property
    def open_occurrences(self) -> dict[str, str]:
        """Group -> occurrence id of every occurrence started and not yet ended."""
        return {g: r.occurrence_id for g, r in self._runs.items() if r.occurrence_id is not None}

    def observe(
        self,
        start_s: float,
        end_s: float,
        scores: Mapping[str, float],
        labels: Sequence[tuple[str, float]] = (),
    ) -> list[SoundDecision]:
        """Take one patch's label-group scores.

        Args:
            start_s: Stream seconds where the patch starts; never before the clock (the last
                `observe` start or `advance` time).
            end_s: Stream seconds where it ends (>= ``start_s``).
            scores: Group -> score in 0..1. A group left out scored 0 on this patch.
            labels: The patch's best AudioSet classes, (display name, score in 0..1).

        Returns:
            The decisions, in order (module docstring); often none.

        Raises:
            ValueError: a time that is not finite, ``end_s < start_s``, ``start_s`` before the
                clock, or a score that is not a number in 0..1 (NaN included).
        """
        _check_time("start_s", start_s)
        _check_time("end_s", end_s)
        if end_s < start_s:
            raise ValueError(f"end_s {end_s} is before start_s {start_s}")
        self._check_not_before(start_s, "start_s")
        for group, score in scores.items():
            _check_score(f"score of {group!r}", score)
        for name, score in labels:
            _check_score(f"score of label {name!r}", score)
        decisions = self._expire(start_s)
        self._clock_s = start_s
        config = self.config
        ignored = config.ignore
        groups = [g for g in scores if g not in ignored]
        groups += sorted(g for g in self._runs if g not in scores)
        for group in groups:
            score = float(scores.get(group, 0.0))
            run = self._runs.get(group)
            if score >= config.off_threshold(group):
                decision = self._heard(group, run, start_s, end_s, score, labels)
                if decision is not None:
                    decisions.append(decision)
            elif run is not None:
                if run.occurrence_id is None:
                    del self._runs[group]  # a candidate that fell silent
                elif end_s - run.heard_until_s >= config.end_after_s:
                    decisions.append(self._end(group))
        return decisions

    def advance(self, now_s: float) -> list[SoundDecision]:
        """Move the clock to ``now_s`` with nothing heard: end what has gone unheard for
        ``end_after_s``. Call it with a time no later patch will start before.

        Raises:
            ValueError: ``now_s`` not finite, or before the clock.
        """
        _check_time("now_s", now_s)
        self._check_not_before(now_s, "now_s")
        decisions = self._expire(now_s)
        self._clock_s = now_s
        return decisions

    def close(self) -> list[SoundDecision]:
        """End every open occurrence (the stream ended) and drop the candidates.

        The tracker stays usable (numbering and clock go on); a second call returns nothing.
        """
        decisions = [self._end(g) for g in self._by_age() if self._runs[g].occurrence_id]
        self._runs.clear()
        return decisions

    def reset(self) -> None:
        """Forget everything without decisions: no occurrence, numbering from 0, no clock."""
        self._numbers = itertools.count()
        self._runs.clear()
        self._clock_s = -math.inf

    # -- internals ----------------------------------------------------------------------------

    def _check_not_before(self, time_s: float, name: str) -> None:
        if time_s < self._clock_s:
            raise ValueError(
                f"{name} {time_s} is before the tracker's clock {self._clock_s}: feed patches "
                "in stream order"
            )

    def _by_age(self) -> list[str]:
        return sorted(self._runs, key=lambda g: (self._runs[g].start_s, g))

    def _expire(self, now_s: float) -> list[SoundDecision]:
        decisions = []
        end_after_s = self.config.end_after_s
        for group in self._by_age():
            run = self._runs[group]
            if now_s - run.heard_until_s < end_after_s:
                continue
            if run.occurrence_id is None:
                del self._runs[group]
            else:
                decisions.append(self._end(group))
        return decisions

    def _heard(
        self,
        group: str,
        run: _Run | None,
        start_s: float,
        end_s: float,
        score: float,
        labels: Sequence[tuple[str, float]],
    ) -> SoundDecision | None:
        """A patch at or above the group's off-threshold."""
        config = self.config
        loud = score >= config.on_threshold(group)
        if run is None:
            if not loud:
                return None  # between the thresholds, nothing to keep alive
            run = self._runs[group] = _Run(start_s, end_s, score, {})
        run.heard_until_s = max(run.heard_until_s, end_s)
        run.score = max(run.score, score)
        self._merge_labels(group, run, labels)
        if run.occurrence_id is None:
            run.patches += loud
            long_enough = run.heard_until_s - run.start_s >= config.min_duration_s
            if run.patches < config.min_patches or not long_enough:
                return None
            run.occurrence_id = f"{self.stream}:sound:{next(self._numbers)}"
            run.last_decision_s = end_s
            return self._decision("start", group, run)
        if group in config.sustained and end_s - run.last_decision_s >= config.update_every_s:
            run.last_decision_s = end_s
            return self._decision("update", group, run)
        return None

    def _merge_labels(self, group: str, run: _Run, labels: Sequence[tuple[str, float]]) -> None:
        classes = self.config.group_classes
        own = None if classes is None else classes.get(group, ())
        for name, score in labels:
            if own is None or name in own:
                run.labels[name] = max(run.labels.get(name, 0.0), float(score))

    def _end(self, group: str) -> SoundDecision:
        return self._decision("end", group, self._runs.pop(group))

    def _decision(self, state: SoundState, group: str, run: _Run) -> SoundDecision:
        assert run.occurrence_id is not None
        best = sorted(run.labels.items(), key=lambda item: (-item[1], item[0]))
        return SoundDecision(
            state=state,
            group=group,
            occurrence_id=run.occurrence_id,
            score=run.score,
            labels=tuple(best[: self.config.max_labels]),
            start_s=run.start_s,
            end_s=run.heard_until_s,
            sustained=group in self.config.sustained,
        )


def _is_number(value: object) -> bool:
    """A real number (numpy's included), not a boolean."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_time(name: str, value: float) -> None:
    if not _is_number(value) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number of stream seconds, got {value!r}")


def _check_score(name: str, value: float) -> None:
    if not _is_number(value) or not 0.0 <= value <= 1.0:  # NaN fails both comparisons
        raise ValueError(f"{name}: expected a number in 0..1, got {value!r}")


def tracker_config(
    sounds: SoundsConfig,
    label_groups: Mapping[str, Sequence[str | tuple[str, str]]] | None = None,
) -> SoundTrackerConfig:
    """The tracker settings of a `[sounds]` slice.

    Args:
        sounds: The validated slice (`agent.config.SoundsConfig`).
        label_groups: The effective groups (`SoundsConfig.label_groups`): each group's classes
            then filter the labels its events list. None: events list every label fed.
    """
    sustained = set(DEFAULT_SUSTAINED_GROUPS)
    sustained |= {g.name for g in sounds.groups if g.sustained is True}
    sustained -= {g.name for g in sounds.groups if g.sustained is False}
    classes = None
    if label_groups is not None:
        classes = {
            name: frozenset(m for m in members if isinstance(m, str))
            for name, members in label_groups.items()
        }
    return SoundTrackerConfig(
        threshold=sounds.threshold,
        thresholds={g.name: g.threshold for g in sounds.groups if g.threshold is not None},
        default_thresholds=DEFAULT_THRESHOLDS,
        off_ratio=sounds.off_ratio,
        min_patches=sounds.min_patches,
        min_duration_s=sounds.min_duration_s,
        end_after_s=sounds.end_after_s,
        update_every_s=sounds.update_every_s,
        sustained=frozenset(sustained),
        ignore=frozenset(sounds.ignore),
        group_classes=classes,
    )


def entity_groups(
    sounds: SoundsConfig, label_groups: Mapping[str, object]
) -> tuple[tuple[str, ...], frozenset[str]]:
    """The label groups a smart home sees (Home Assistant discovery): those that make sound
    events (the effective groups, ``label_groups``, minus `SoundsConfig.ignore`) and those of
    them that are sustained (get updates)."""
    config = tracker_config(sounds)
    groups = tuple(g for g in label_groups if g not in config.ignore)
    return groups, frozenset(g for g in groups if g in config.sustained)
