"""Speech workload pieces without Ray: wav decoding and its rejects, features, the models' length handling, the
task's config rules and request checks."""

from __future__ import annotations

import base64
import io
import json

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


def test_oip_takes_wav_files_as_binary_bytes_or_waveforms_with_their_sample_rate():
    """Either input of the signature reaches the replica as the same decoded waveform; JSON text cannot carry
    a wav file, a waveform needs the model's sample rate, and each mistake is a 400 naming it."""
    from aidc.serving.oip import protocol as oip

    task = get_task("speech_classification")
    features = {"sample_rate": 8000, "num_classes": 10}
    sig = task.tensor_signature(features)
    assert [(t["name"], t["datatype"], t["shape"]) for t in sig["inputs"]] == [("audio", "BYTES", [-1]),
                                                                               ("waveform", "FP32", [-1, -1])]
    good = (RECORDINGS / "3_theo_7.wav").read_bytes()
    wave = decode_wav(good, 8000)[0]
    blob = oip.to_binary(np.array([good], dtype=object), "BYTES")
    header = json.dumps({"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(blob)}}]}).encode()
    _, arrays = oip.parse_rest_body(header + blob, str(len(header)), 10**6)
    checked = oip.validate_inputs(arrays, {"audio": "BYTES"}, sig, "m")
    assert checked["audio"][0] == good  # raw bytes kept: a wav file is not UTF-8 text
    from_file = task.check_tensor_inputs(checked, features)
    from_wave = task.check_tensor_inputs({"waveform": wave[None, :]}, features, {"sample_rate": 8000})
    np.testing.assert_array_equal(from_file["waveform"][0], from_wave["waveform"][0])
    assert oip.merge_parameters({"sample_rate": 8000, "binary_data_output": True},
                                [{"binary_data_size": 4}]) == {"sample_rate": 8000}

    with pytest.raises(RequestError, match="binary tensor extension"):  # a wav file as JSON text
        oip.validate_inputs({"audio": np.array(["UklGRg=="], dtype=object)}, {"audio": "BYTES"}, sig, "m")
    with pytest.raises(RequestError, match="send one input"):
        task.check_tensor_inputs({}, features)
    with pytest.raises(RequestError, match="send one input"):
        task.check_tensor_inputs({"audio": checked["audio"], "waveform": wave[None, :]}, features,
                                 {"sample_rate": 8000})
    with pytest.raises(RequestError, match="set parameters.sample_rate \\(the model takes 8000 Hz\\)"):
        task.check_tensor_inputs({"waveform": wave[None, :]}, features, {})
    with pytest.raises(RequestError, match="sample_rate is 16000; model takes 8000 Hz") as err:
        task.check_tensor_inputs({"waveform": wave[None, :]}, features, {"sample_rate": 16000})
    assert err.value.status == 400
    for same in (8000.0, "8000"):  # a float (tritonclient gRPC: double_param) or text: the same rate
        task.check_tensor_inputs({"waveform": wave[None, :]}, features, {"sample_rate": same})
    for wrong in ("fast", True):
        with pytest.raises(RequestError, match="must be a number of Hz"):
            task.check_tensor_inputs({"waveform": wave[None, :]}, features, {"sample_rate": wrong})
    with pytest.raises(RequestError, match="outside \\[-1, 1\\]"):
        task.check_tensor_inputs({"waveform": wave[None, :] * 32768}, features, {"sample_rate": 8000})
    with pytest.raises(RequestError, match="no samples"):
        task.check_tensor_inputs({"waveform": np.zeros((1, 0), np.float32)}, features, {"sample_rate": 8000})

    # requests of both kinds and of different lengths batch together on the replica (run_batch concatenates)
    from aidc.serving.oip.plane import run_batch

    class Model:
        def infer_tensors(self, batch):
            return {"samples": np.array([len(w) for w in batch["waveform"]])}

    short = task.check_tensor_inputs({"waveform": wave[None, :800]}, features, {"sample_rate": 8000})
    parts = run_batch(Model(), [from_file, short, from_wave])
    assert [p["samples"].tolist() for p in parts] == [[len(wave)], [800], [len(wave)]]
    assert get_task("image_classification").check_tensor_inputs.__defaults__ == (None,)  # takes parameters


def test_batch_inference_takes_a_wav_folder_only_for_speech_models():
    from aidc.batch.job import _read_files
    from aidc.config import BatchInferConfig

    b = BatchInferConfig(path="/tmp/recordings", format="wav")
    with pytest.raises(ConfigError, match="format wav does not fit a image_classification model, which scores "
                                          "csv, parquet or jsonl rows"):
        _read_files(b, get_task("image_classification"), {"task": "image_classification"})
    with pytest.raises(ConfigError, match="key 'audio' is the column that holds each file's contents"):
        _read_files(b.model_copy(update={"key": "audio"}), get_task("speech_classification"),
                    {"task": "speech_classification"})
    from aidc.tasks.base import jsonable

    assert jsonable(np.bytes_(b"RIFF")) == jsonable(b"RIFF") == {"b64": "UklGRg=="}  # rejected rows keep JSON


def test_edge_runner_reads_wav_and_computes_the_platform_features_without_librosa(tmp_path):
    """The bundle's numpy log-mel (librosa's filterbank shipped with it) equals the platform's librosa one."""
    from aidc.data.audio import mel_filters
    from aidc.export import edge_runner

    state = {"sample_rate": 8000, "n_mels": 40, "n_fft": 256, "hop": 80}
    filters = mel_filters(8000, 40, 256)
    for path in (RECORDINGS / "3_theo_7.wav", RECORDINGS / "0_jackson_0.wav"):
        wave = edge_runner.read_wav(str(path), 8000)
        np.testing.assert_array_equal(wave, decode_wav(path.read_bytes(), 8000)[0])
        np.testing.assert_allclose(edge_runner.log_mel(wave, state, filters), log_mel(wave, 8000, 40, 256, 80),
                                   atol=1e-3)  # dB (30 recordings: <= 1.5e-4): float32 FFTs in two libraries
    short = np.sin(np.arange(50, dtype=np.float32))  # shorter than one window
    np.testing.assert_allclose(edge_runner.log_mel(short, state, filters), log_mel(short, 8000, 40, 256, 80),
                               atol=1e-3)
    with pytest.raises(ValueError, match="sample rate 8000 Hz; expected 16000 Hz"):
        edge_runner.read_wav(str(RECORDINGS / "3_theo_7.wav"), 16000)
    truncated = (RECORDINGS / "3_theo_7.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(truncated[:len(truncated) // 2 + 1])  # an odd byte count too
    with pytest.raises(ValueError, match="truncated: the header declares"):
        edge_runner.read_wav(str(tmp_path / "cut.wav"), 8000)
    (tmp_path / "text.wav").write_text("not audio")
    with pytest.raises(ValueError, match="not a PCM wav file"):
        edge_runner.read_wav(str(tmp_path / "text.wav"), 8000)
    for bad, words in (([], "non-empty flat list"), ([[0.1, 0.2]], "non-empty flat list"),
                       ([0.1, float("nan")], "NaN or infinite"), ([0.5, 300.0], "outside \\[-1, 1\\]")):
        with pytest.raises(ValueError, match=words):
            edge_runner.checked_waveform(bad, "row 0")


def test_named_speech_splits_are_the_predefined_and_group_strategies():
    cfg = load_config(CONFIGS / "fsdd.yaml")
    assert (cfg.data.split.strategy, cfg.data.split.train, cfg.data.split.test) == ("predefined", 0.9, 0)
    held = load_config(CONFIGS / "fsdd.yaml", ["data.split.strategy=speaker", "data.split.test_groups=[theo]"])
    s = held.data.split
    assert (s.strategy, s.group_column, s.test_groups, s.train, s.val, s.test) == ("group", "speaker", ["theo"],
                                                                                   0.9, 0.1, 0)
    with pytest.raises(ConfigError, match="test_groups"):
        load_config(CONFIGS / "fsdd.yaml", ["data.split.strategy=speaker"])
