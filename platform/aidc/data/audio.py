"""Audio: wav decoding with the reason a file cannot be used, log-mel features, waveform augmentation.

Decoding is libsndfile's (`soundfile`); features are librosa's mel filterbank over a short-time Fourier
transform. Preprocessing, training, the served model and batch inference all call these, so they cannot drift.
"""

from __future__ import annotations

import io
import wave

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
    if fmt != "WAV":
        return None, f"{fmt} audio, not wav"
    if channels != 1:
        return None, f"{channels} channels; expected mono (1 channel)"
    if rate != sample_rate:
        return None, f"sample rate {rate} Hz; expected {sample_rate} Hz"
    declared = _declared_frames(data)
    if declared is not None and declared > len(audio):
        return None, f"truncated: the header declares {declared} samples, the file holds {len(audio)}"
    if len(audio) == 0:
        return None, "no samples"
    return audio[:, 0], ""


def _declared_frames(data: bytes) -> int | None:
    """Samples the RIFF header's data chunk declares (libsndfile reads a cut-off file without a word)."""
    try:
        with wave.open(io.BytesIO(data)) as w:
            return w.getnframes()
    except (wave.Error, EOFError):
        return None  # not PCM (e.g. float wav): nothing to compare


def log_mel(waveform: np.ndarray, sample_rate: int, n_mels: int, n_fft: int, hop: int) -> np.ndarray:
    """(frames, n_mels) float32 log mel power of one waveform in dB below its loudest bin, floored at TOP_DB
    (librosa, centered frames): the same for any gain, and silence reads the same with or without faint noise."""
    import librosa

    mel = librosa.feature.melspectrogram(y=np.asarray(waveform, np.float32), sr=sample_rate, n_fft=n_fft,
                                         hop_length=hop, n_mels=n_mels, fmax=sample_rate / 2, power=2.0)
    return librosa.power_to_db(mel, ref=np.max, amin=1e-10, top_db=TOP_DB).T.astype(np.float32)


def frames_of(samples: int, hop: int) -> int:
    """Frames log_mel gives for `samples` samples (centered: one per hop, plus one)."""
    return 1 + samples // hop


def augment_waveform(x: np.ndarray, cfg: dict, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Random time shift (samples rolled in from silence), gain, and white noise at a random signal-to-noise ratio
    (noise_snr_db to noise_snr_db + 20 dB below the recording's own level) of one waveform."""
    shift = int(rng.integers(-cfg["max_time_shift_ms"], cfg["max_time_shift_ms"] + 1) * sample_rate / 1000)
    if shift > 0:
        x = np.concatenate([np.zeros(shift, np.float32), x])
    elif shift < 0:
        x = x[-shift:] if len(x) > -shift else x
    gain = 10 ** (rng.uniform(-cfg["max_gain_db"], cfg["max_gain_db"]) / 20)
    x = x * gain
    if cfg["noise_snr_db"] is not None:
        rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0
        snr = rng.uniform(cfg["noise_snr_db"], cfg["noise_snr_db"] + 20)
        x = x + rng.normal(0.0, rms * 10 ** (-snr / 20), len(x))
    return np.clip(x, -1.0, 1.0).astype(np.float32)
