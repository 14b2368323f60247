"""Speech workload pieces without Ray: wav decoding and its rejects, features, the models' length handling, the
task's config rules and request checks."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch

from aidc.config import load_config
from aidc.data.audio import decode_wav, frames_of, log_mel
from aidc.errors import ConfigError, RequestError
from aidc.models.audio import SpeechCNN, SpeechRNN
from aidc.tasks import get_task
from tests.conftest import CONFIGS, SHARED_DATA

RECORDINGS = SHARED_DATA / "fsdd" / "recordings"


def _wav(x: np.ndarray, rate: int, subtype: str = "PCM_16") -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, x, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def broken_wavs(good: bytes) -> dict[str, tuple[bytes, str]]:
    """Each kind of file the issue names, with the words its reject reason must hold."""
    return {
        "truncated": (good[: len(good) // 2], "truncated: the header declares"),
        "truncated float": (_wav(np.zeros(800, np.float32), 8000, "FLOAT")[:1000], "truncated: the header declares"),
        "NaN samples": (_wav(np.full(800, np.nan, np.float32), 8000, "FLOAT"), "NaN or infinite"),
        "stereo": (_wav(np.zeros((800, 2), np.float32), 8000), "2 channels; expected mono"),
        "44.1 kHz": (_wav(np.zeros(4410, np.float32), 44100), "sample rate 44100 Hz; expected 8000 Hz"),
        "empty": (b"", "empty file"),
        "text named .wav": (b"this is not audio\n", "not a readable audio file"),
    }


def test_real_recordings_decode_and_every_broken_kind_is_rejected_with_its_reason():
    good = (RECORDINGS / "0_george_0.wav").read_bytes()
    wave, why = decode_wav(good, 8000)
    assert why == "" and wave.dtype == np.float32 and wave.ndim == 1 and len(wave) == 2384
    assert np.abs(wave).max() <= 1.0
    for kind, (data, words) in broken_wavs(good).items():
        wave, why = decode_wav(data, 8000)
        assert wave is None and words in why, (kind, why)


def test_wav_variants_that_are_fine_decode():
    """24-bit WAVE_FORMAT_EXTENSIBLE, float and 8-bit wavs are recordings too (mono, the right rate)."""
    x = np.sin(np.linspace(0, 200, 1600)).astype(np.float32) * 0.5
    for subtype in ("PCM_24", "FLOAT", "PCM_U8"):
        wave, why = decode_wav(_wav(x, 8000, subtype), 8000)
        assert why == "" and len(wave) == 1600 and np.abs(wave - x).max() < 0.02, (subtype, why)


def test_log_mel_frames_and_the_task_pads_cuts_and_standardizes():
    x = np.random.default_rng(0).normal(0, 0.1, 8000).astype(np.float32)
    f = log_mel(x, 8000, 40, 256, 80)
    assert f.shape == (frames_of(8000, 80), 40) == (101, 40) and np.isfinite(f).all()
    task = get_task("speech_classification")
    state = {"sample_rate": 8000, "n_mels": 40, "n_fft": 256, "hop": 80, "max_frames": 60,
             "mean": f.mean(0).tolist(), "std": f.std(0).tolist()}
    frames, lengths = task.frames([x[:1600], x], state)
    assert frames.shape == (2, 60, 40) and lengths.tolist() == [21, 60]
    assert (frames[0, 21:] == 0).all()  # padding after the real frames
    np.testing.assert_allclose(frames[1], ((f - f.mean(0)) / f.std(0))[:60], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_recurrent_model_predictions_do_not_depend_on_padding(cell, bidirectional):
    """A recording padded to 30 or to 80 frames gets the same logits (the state read is after its last real frame,
    and the backward stack starts at it)."""
    torch.manual_seed(0)
    model = SpeechRNN(n_mels=8, num_classes=10, hidden=16, layers=2, cell=cell, bidirectional=bidirectional).eval()
    x = torch.randn(3, 30, 8)
    lengths = torch.tensor([30, 17, 5])
    longer = torch.cat([x, torch.randn(3, 50, 8)], dim=1)  # garbage, not zeros, after the real frames
    for i in (1, 2):
        x[i, lengths[i]:] = torch.randn(30 - lengths[i], 8)
    a, b = model(x, lengths), model(longer, lengths)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    one = model(x[2:3, :5], lengths[2:3])  # the recording alone, unpadded
    torch.testing.assert_close(a[2:3], one, rtol=1e-5, atol=1e-5)


def test_cnn_takes_the_mean_over_real_frames_only():
    """Frames past a recording's length reach its mean only through the convolutions' edge (two 3x3 blocks: 2
    frames); anything further out changes nothing."""
    torch.manual_seed(0)
    model = SpeechCNN(n_mels=16, num_classes=10, channels=[4, 8], hidden=8).eval()
    x, lengths = torch.randn(2, 40, 16), torch.tensor([40, 12])
    out = model(x, lengths)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    changed = x.clone()
    changed[1, 14:] = torch.randn(26, 16) * 10
    torch.testing.assert_close(model(changed, lengths), out)
    changed[1, 12:14] = 0  # within the receptive field: it does count
    assert not torch.allclose(model(changed, lengths)[1], out[1])


def test_config_rules_and_both_architectures():
    cfg = load_config(CONFIGS / "fsdd.yaml")
    assert cfg.task == "speech_classification" and cfg.model.arch == "speech_rnn" and cfg.data.split.strategy == "predefined"
    cnn = load_config(CONFIGS / "fsdd.yaml", ["model={arch: speech_cnn}"])
    assert cnn.model.channels == [16, 32]
    with pytest.raises(ConfigError, match="fewer than n_mels 200"):
        load_config(CONFIGS / "fsdd.yaml", ["data.audio.n_mels=200"])
    with pytest.raises(ConfigError, match="model.cell: got 'rnn'"):
        load_config(CONFIGS / "fsdd.yaml", ["model.cell=rnn"])
    with pytest.raises(ConfigError, match="halves the 40 mel bands"):
        load_config(CONFIGS / "fsdd.yaml", ["model={arch: speech_cnn, channels: [8, 8, 8, 8, 8, 8]}"])
    # recordings are speech's data: another task naming them is refused at load time, not deep in preprocessing
    with pytest.raises(ConfigError, match="data.source fsdd is data for task: speech_classification"):
        load_config(CONFIGS / "digits.yaml", ["data.source=fsdd"])


def test_requests_carry_wav_files_and_bad_ones_get_a_clear_error():
    task = get_task("speech_classification")
    features = {"sample_rate": 8000}
    good = (RECORDINGS / "3_theo_7.wav").read_bytes()
    parsed = task.parse_instances([{"b64": base64.b64encode(good).decode()}], features, 8)
    assert parsed[0] == good
    for kind, (data, words) in broken_wavs(good).items():
        with pytest.raises(RequestError, match="instances\\[0\\]") as err:
            task.parse_instances([{"b64": base64.b64encode(data).decode()}], features, 8)
        assert words in str(err.value), kind
        with pytest.raises(RequestError, match="audio\\[1\\]"):
            task.check_tensor_inputs({"audio": np.array([good, data], dtype=object)}, features)
    with pytest.raises(RequestError, match="not valid base64"):
        task.parse_instances([{"b64": "%%%"}], features, 8)
    with pytest.raises(RequestError, match='must be {"b64"'):
        task.parse_instances([[0.1, 0.2]], features, 8)
    with pytest.raises(RequestError, match="expected a wav file's bytes, got str"):
        task.check_tensor_inputs({"audio": np.array(["text"], dtype=object)}, features)
    # a batch-inference input row (a Parquet binary column) becomes the API's instance
    assert task.parse_instances([task.batch_instance({"audio": good})], features, 8)[0] == good
