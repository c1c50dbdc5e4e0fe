"""Read a whole audio file as 16 kHz mono float32, with clear errors for bad input.

This is the one-shot loader used by ``salmonn-live ask`` and the model. For streaming a long
file block by block, use :class:`streaming.sources.FileSource` instead.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import numpy as np
import numpy.typing as npt
import soundfile

from streaming.errors import AudioInputError
from streaming.pcm import SAMPLE_RATE_HZ
from streaming.resample import resample

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_FILE_RATE_HZ",
    "MIN_FILE_RATE_HZ",
    "check_ogg_complete",
    "check_wav_complete",
    "load_audio",
    "open_sound_file",
]

#: Sample rates a file may declare. Outside them a header is corrupt or hostile: a file that
#: claims 1 Hz would be resampled to 16000 times as many samples (minutes of CPU, gigabytes).
MIN_FILE_RATE_HZ = 4000
MAX_FILE_RATE_HZ = 768000


def check_wav_complete(path: Path) -> None:
    """Raise if a RIFF/WAVE file's ``data`` chunk is shorter than its header says.

    libsndfile silently reads what is there from a truncated WAV file; a cut-off upload or an
    interrupted copy should be an error instead. Files whose header holds a placeholder size
    (0 or 0xFFFFFFFF, as written by some streaming recorders) are accepted. Non-WAV files are
    not checked here.

    Args:
        path: The file to check.

    Raises:
        AudioInputError: If the ``data`` chunk runs past the end of the file.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            header = f.read(12)
            if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
                return
            position = 12
            while position + 8 <= size:
                f.seek(position)
                chunk = f.read(8)
                if len(chunk) < 8:
                    return
                chunk_id, chunk_size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
                if chunk_id == b"data":
                    if chunk_size in (0, 0xFFFFFFFF):
                        return
                    available = size - position - 8
                    if available < chunk_size:
                        raise AudioInputError(
                            f"{path}: truncated WAV file: header promises {chunk_size} bytes of"
                            f" audio, file holds {available}; re-copy or re-record it"
                        )
                    return
                position += 8 + chunk_size + (chunk_size & 1)
    except OSError as exc:
        raise AudioInputError(f"{path}: cannot read file: {exc.strerror or exc}") from exc


#: Largest Ogg page: 27-byte header, 255 lacing values, 255 segments of 255 bytes.
_OGG_MAX_PAGE = 27 + 255 + 255 * 255
_OGG_EOS = 0x04  # header_type flag: last page of a logical bitstream


def _ogg_crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
        table.append(crc & 0xFFFFFFFF)
    return tuple(table)


_OGG_CRC_TABLE = _ogg_crc_table()


def _ogg_crc(page: bytes) -> int:
    """The Ogg page checksum (CRC-32, polynomial 0x04C11DB7, unreflected, initial 0)."""
    crc = 0
    table = _OGG_CRC_TABLE
    for byte in page:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ table[(crc >> 24) ^ byte]
    return crc


def _ogg_last_page_flags(tail: bytes) -> int | None:
    """Header flags of the valid Ogg page that ends exactly at the end of ``tail``, or None."""
    position = tail.rfind(b"OggS")
    while position >= 0:
        header_end = position + 27
        if header_end <= len(tail) and tail[position + 4] == 0:
            segments = tail[position + 26]
            body_start = header_end + segments
            if body_start <= len(tail):
                end = body_start + sum(tail[header_end:body_start])
                if end == len(tail):
                    page = tail[position:end]
                    stored = struct.unpack("<I", page[22:26])[0]
                    if _ogg_crc(page[:22] + b"\0\0\0\0" + page[26:]) == stored:
                        return page[5]
        position = tail.rfind(b"OggS", 0, position)
    return None


def check_ogg_complete(path: Path) -> None:
    """Raise if an Ogg file (Vorbis, Opus, FLAC in Ogg) does not end with a complete
    end-of-stream page.

    libsndfile reads a cut-off Ogg file up to its last complete page without any error (and
    reports that many frames), so a truncated upload would pass as a shorter recording. The
    last page must be intact (its checksum matches) and carry the end-of-stream flag. Non-Ogg
    files are not checked here.

    Args:
        path: The file to check.

    Raises:
        AudioInputError: If the file ends inside a page or without an end-of-stream page.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            if f.read(4) != b"OggS":
                return
            f.seek(max(0, size - _OGG_MAX_PAGE))
            tail = f.read()
    except OSError as exc:
        raise AudioInputError(f"{path}: cannot read file: {exc.strerror or exc}") from exc
    flags = _ogg_last_page_flags(tail)
    if flags is None:
        raise AudioInputError(
            f"{path}: truncated Ogg file: it does not end with a complete page (cut off or"
            " damaged); re-copy or re-record it"
        )
    if not flags & _OGG_EOS:
        raise AudioInputError(
            f"{path}: truncated Ogg file: its last page lacks the end-of-stream flag;"
            " re-copy or re-record it"
        )


def open_sound_file(path: str | Path) -> soundfile.SoundFile:
    """Open an audio file for reading, translating every failure to :class:`AudioInputError`.

    Args:
        path: A wav, flac, ogg (or any other libsndfile format) file.

    Returns:
        An open ``soundfile.SoundFile``; the caller closes it.

    Raises:
        AudioInputError: Missing file, a directory, unknown format, unreadable header,
            truncated WAV or Ogg data, zero length, or a sample rate outside
            `MIN_FILE_RATE_HZ`..`MAX_FILE_RATE_HZ`.
    """
    file_path = Path(path)
    if not file_path.exists():
        raise AudioInputError(f"{file_path}: no such file")
    if not file_path.is_file():
        raise AudioInputError(f"{file_path}: not a regular file")
    check_wav_complete(file_path)
    check_ogg_complete(file_path)
    try:
        sound = soundfile.SoundFile(str(file_path))
    except soundfile.LibsndfileError as exc:
        message = str(exc).split(":", 1)[-1].strip() if "opening" in str(exc) else str(exc)
        raise AudioInputError(
            f"{file_path}: cannot decode audio ({message}); expected wav, flac or ogg"
        ) from exc
    except (OSError, RuntimeError) as exc:
        raise AudioInputError(f"{file_path}: cannot open audio file: {exc}") from exc
    if sound.frames == 0:
        sound.close()
        raise AudioInputError(f"{file_path}: zero-length audio (empty or truncated file)")
    if not MIN_FILE_RATE_HZ <= sound.samplerate <= MAX_FILE_RATE_HZ:
        rate_hz = sound.samplerate
        sound.close()
        raise AudioInputError(
            f"{file_path}: sample rate {rate_hz} Hz out of range: expected "
            f"{MIN_FILE_RATE_HZ}..{MAX_FILE_RATE_HZ} Hz (corrupt header?)"
        )
    return sound


def load_audio(path: str | Path, sample_rate_hz: int = SAMPLE_RATE_HZ) -> npt.NDArray[np.float32]:
    """Load a whole audio file as mono float32 at ``sample_rate_hz``.

    Several channels are **averaged** to mono. Other rates are converted with
    :func:`streaming.resample.resample`. One INFO line is logged when the file is downmixed or
    resampled.

    Args:
        path: A wav, flac or ogg file (any format libsndfile reads).
        sample_rate_hz: Output sample rate in Hz (default 16 kHz).

    Returns:
        float32 samples in [-1, 1] (float files' samples beyond are clipped), shape
        ``(samples,)``.

    Raises:
        AudioInputError: Missing file, unknown format, unreadable, corrupt or truncated file,
            zero length, or NaN/inf samples.
    """
    with open_sound_file(path) as sound:
        rate_hz, channels, declared_frames = sound.samplerate, sound.channels, sound.frames
        try:
            data = sound.read(dtype="float32", always_2d=True)
        except (soundfile.LibsndfileError, RuntimeError) as exc:
            raise AudioInputError(f"{path}: corrupt audio data ({exc})") from exc
    if data.shape[0] == 0:
        raise AudioInputError(f"{path}: zero-length audio (empty or truncated file)")
    if data.shape[0] < declared_frames:
        raise AudioInputError(
            f"{path}: truncated audio: header declares {declared_frames} frames, only"
            f" {data.shape[0]} could be decoded"
        )
    if not np.isfinite(data).all():
        bad = int(np.count_nonzero(~np.isfinite(data)))
        raise AudioInputError(f"{path}: {bad} NaN or infinite samples; expected finite audio")
    # Float files may hold samples beyond full scale; averaging huge ones would give inf.
    np.clip(data, -1.0, 1.0, out=data)
    if channels > 1 or rate_hz != sample_rate_hz:
        logger.info(
            "%s: %d channel(s) at %d Hz -> mono at %d Hz (channels averaged)",
            path,
            channels,
            rate_hz,
            sample_rate_hz,
        )
    return resample(data, rate_hz, sample_rate_hz)
