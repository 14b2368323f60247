"""Audio: wav decoding with the reason a file cannot be used, log-mel features, waveform augmentation.

Decoding is libsndfile's (`soundfile`); features are librosa's mel filterbank over a short-time Fourier
transform. Preprocessing, training, the served model and batch inference all call these, so they cannot drift.
"""

from __future__ import annotations

import io

import numpy as np

TOP_DB = 80.0  # the log-mel floor: this far below the recording's loudest frame (silence, faint noise alike)


def decode_wav(data: bytes, sample_rate: int) -> tuple[np.ndarray | None, str]:
    """A wav file's bytes -> (mono float32 waveform in -1..1, '') or (None, why it cannot be used)."""
    import soundfile as sf

    if not data:
        return None, "empty file"
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate, channels, fmt = f.samplerate, f.channels, f.format
            audio = f.read(dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        return None, f"not a readable audio file ({str(exc).rpartition(': ')[2] or exc})"
    if fmt not in ("WAV", "WAVEX"):
        return None, f"{fmt} audio, not wav"
    if channels != 1:
        return None, f"{channels} channels; expected mono (1 channel)"
    if rate != sample_rate:
        return None, f"sample rate {rate} Hz; expected {sample_rate} Hz"
    declared, present = _data_chunk(data)
    if declared is not None and declared > present:
        return None, f"truncated: the header declares {declared} bytes of audio, the file holds {present}"
    if len(audio) == 0:
        return None, "no samples"
    if not np.isfinite(audio).all():
        return None, "samples are NaN or infinite"
    return np.clip(audio[:, 0], -1.0, 1.0), ""


def _data_chunk(data: bytes) -> tuple[int | None, int]:
    """(bytes the RIFF `data` chunk declares, bytes of it the file holds); None declared where the size is not
    given (0 or 0xFFFFFFFF: a streamed header). libsndfile reads a cut-off file without a word, any codec."""
    pos = 12  # after "RIFF" <size> "WAVE"
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if cid == b"data":
            return (None if size in (0, 0xFFFFFFFF) else size), len(data) - pos - 8
        pos += 8 + size + (size & 1)  # chunks are word-aligned
    return None, 0


def log_mel(waveform: np.ndarray, sample_rate: int, n_mels: int, n_fft: int, hop: int) -> np.ndarray:
    """(frames, n_mels) float32 log mel power of one waveform in dB below its loudest bin, floored at TOP_DB
    (librosa, centered frames): the same for any gain, and silence reads the same with or without faint noise."""
    import librosa

    mel = librosa.feature.melspectrogram(y=np.asarray(waveform, np.float32), sr=sample_rate, n_fft=n_fft,
                                         hop_length=hop, n_mels=n_mels, fmax=sample_rate / 2, power=2.0,
                                         window="hann", center=True, pad_mode="constant")  # as the edge runner
    return librosa.power_to_db(mel, ref=np.max, amin=1e-10, top_db=TOP_DB).T.astype(np.float32)


def mel_filters(sample_rate: int, n_mels: int, n_fft: int) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) float32: the filterbank log_mel applies (librosa's Slaney mel, up to Nyquist)."""
    import librosa

    return librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmax=sample_rate / 2).astype(np.float32)


def frames_of(samples: int, hop: int) -> int:
    """Frames log_mel gives for `samples` samples (centered: one per hop, plus one)."""
    return 1 + samples // hop


def augment_waveform(x: np.ndarray, cfg: dict, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Random time shift (samples rolled in from silence) and white noise at a random signal-to-noise ratio
    (noise_snr_db to noise_snr_db + 20 dB below the recording's own level) of one waveform. No gain: the features
    are relative to each recording's loudest bin, so a gain would change nothing."""
    shift = int(rng.integers(-cfg["max_time_shift_ms"], cfg["max_time_shift_ms"] + 1) * sample_rate / 1000)
    if shift > 0:
        x = np.concatenate([np.zeros(shift, np.float32), x])
    elif shift < 0:
        x = x[-shift:] if len(x) > -shift else x
    if cfg["noise_snr_db"] is not None:
        rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0
        snr = rng.uniform(cfg["noise_snr_db"], cfg["noise_snr_db"] + 20)
        x = x + rng.normal(0.0, rms * 10 ** (-snr / 20), len(x))
    return np.clip(x, -1.0, 1.0).astype(np.float32)
