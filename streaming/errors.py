"""Errors raised by `streaming/`. The command line turns them into one line and exit code 2."""


class StreamingError(Exception):
    """Base class for audio input and segmentation errors."""


class AudioInputError(StreamingError):
    """Audio that cannot be used: unreadable, truncated, empty, non-finite, wrong format."""


class AudioDeviceError(StreamingError):
    """No usable capture device (none present, unknown name or index, PortAudio failure)."""


class UnsupportedRateError(AudioInputError):
    """A sample rate the chosen VAD backend cannot take (resample to 16 kHz first)."""


class SegmenterConfigError(StreamingError):
    """Segmenter settings out of range (for example a frame length webrtcvad cannot use)."""
