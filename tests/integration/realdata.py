"""Labelled evaluation data for real pretrained models, generated reproducibly.

* OCR: captchas drawn by the ``captcha`` package (its font ships in the wheel), with the
  package's ``secrets`` calls routed to a seeded ``random.Random``.
* Orientation: text pages rendered with the same font, rotated clockwise by 0/90/180/270.
* Voice activity: a real speech recording (CMU ARCTIC a0007, shipped in pysptk's source
  archive) cut, re-pitched and mixed into noise, hum and tones; labels from the clean speech.
"""

from __future__ import annotations

import importlib.util
import random
import sys
import tarfile
import wave
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tests.conftest import CACHE, wheel_path

ALPHABET = "2345678abcdefhkmnprstuvwxy"  # glyphs the font draws unambiguously
WORDS = ("the quick brown fox jumps over lazy dog quantization model edge device accuracy network "
         "layer tensor scale zero point calibration sample image text line page document report "
         "table figure result method data value").split()


def _unpack(key: str, prefix: str) -> Path:
    root = CACHE / "pkgs" / key
    if not root.exists():
        with zipfile.ZipFile(wheel_path(key)) as z:
            for name in z.namelist():
                if name.startswith(prefix) and not name.endswith(".onnx"):
                    z.extract(name, root)
    return root


def captcha_module(seed: int):
    """The captcha package's image module with a seeded generator in place of ``secrets``."""
    root = _unpack("captcha", "captcha/")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import captcha.image as ci

    rng = random.Random(seed)

    class Seeded:
        randbelow = staticmethod(lambda n: rng.randrange(n))
        choice = staticmethod(lambda s: rng.choice(s))
        randbits = staticmethod(lambda k: rng.getrandbits(k))

    ci.secrets = Seeded
    return ci, rng


def ocr_charset() -> list[str]:
    root = _unpack("ddddocr", "ddddocr/charsets.py")
    spec = importlib.util.spec_from_file_location("dddd_charsets", root / "ddddocr" / "charsets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CHARSET_BETA


def captchas(n: int, seed: int) -> list[tuple[str, np.ndarray]]:
    """``n`` (text, image) pairs; widths vary from 120 to 200 px, height scaled to 64."""
    ci, rng = captcha_module(seed)
    out = []
    for _ in range(n):
        width = rng.choice([120, 140, 160, 180, 200])
        text = "".join(rng.choice(ALPHABET) for _ in range(4))
        im = ci.ImageCaptcha(width=width, height=60).generate_image(text)
        w = int(im.size[0] * 64 / im.size[1])
        im = im.resize((w, 64), Image.LANCZOS).convert("L")
        out.append((text, (np.asarray(im, np.float32) / 255.0)[None, None]))
    return out


def ctc_decode(logits: np.ndarray, charset: list[str]) -> str:
    idx = logits.reshape(logits.shape[0], -1).argmax(-1)
    chars, prev = [], None
    for k in map(int, idx):
        if k != prev and k != 0:
            chars.append(charset[k])
        prev = k
    return "".join(chars)


def _font(size: int):
    root = _unpack("captcha", "captcha/")
    return ImageFont.truetype(str(root / "captcha" / "data" / "DroidSansMono.ttf"), size)


def text_page(rng: random.Random) -> Image.Image:
    w, h = rng.choice([(480, 360), (400, 520), (560, 400)])
    im = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(im)
    font = _font(rng.randint(16, 26))
    y = rng.randint(5, 20)
    while y < h - 30:
        line = " ".join(rng.choice(WORDS) for _ in range(12))
        draw.text((rng.randint(5, 20), y), line, fill=(rng.randint(0, 60),) * 3, font=font)
        y += int(font.size * 1.5)
    return im


def ppocr_charset(model) -> list[str]:
    """PP-OCR recognizer classes: CTC blank, the dictionary in the model's metadata, space."""
    chars = next(p.value for p in model.metadata_props if p.key == "character").splitlines()
    return ["blank", *chars, " "]


def text_line(rng: random.Random, max_words: int) -> tuple[str, Image.Image]:
    """(text, image): one to ``max_words`` words, half the time with a number, dark on a light
    background at a random size, 40 px high."""
    words = [rng.choice(WORDS) for _ in range(rng.randint(1, max_words))]
    if rng.random() < 0.5:
        words.append(str(rng.randint(10, 9999)))
    text = " ".join(words)
    font = _font(rng.randint(22, 30))
    im = Image.new("RGB", (int(font.getlength(text)) + 16, 40), (rng.randint(200, 255),) * 3)
    ImageDraw.Draw(im).text((8, 4), text, fill=(rng.randint(0, 60),) * 3, font=font)
    return text, im


def text_lines(n: int, seed: int) -> list[tuple[str, np.ndarray]]:
    """(text, PP-OCR recognizer input): ``text_line`` (up to three words) resized to height 48
    (width at most 320), scaled to [-1, 1] and padded to 320 columns."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text, im = text_line(rng, 3)
        width = min(320, int(np.ceil(48 * im.size[0] / im.size[1])))
        a = np.asarray(im.resize((width, 48)), np.float32).transpose(2, 0, 1) / 127.5 - 1.0
        x = np.zeros((1, 3, 48, 320), np.float32)
        x[0, :, :, :width] = a
        out.append((text, x))
    return out


def orientation_pages(n: int, seed: int) -> list[tuple[int, np.ndarray]]:
    """(label index, NCHW float input) with PP-LCNet preprocessing: short side 256, crop 224."""
    rng = random.Random(seed)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    out = []
    for i in range(n):
        k = i % 4
        im = text_page(rng).rotate(-90 * k, expand=True)
        s = 256 / min(im.size)
        im = im.resize((round(im.size[0] * s), round(im.size[1] * s)), Image.LANCZOS)
        left, top = (im.size[0] - 224) // 2, (im.size[1] - 224) // 2
        a = np.asarray(im.crop((left, top, left + 224, top + 224)), np.float32) / 255.0
        out.append((k, ((a - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)))
    return out


def magika_features(data: bytes) -> np.ndarray:
    """magika v3 input: first/last 1024 bytes of the stripped first/last 4 KiB, padded with 256."""
    beg = data[:4096].lstrip()[:1024]
    end = data[-4096:].rstrip()[-1024:]
    feat = np.full(2048, 256, np.int32)
    feat[: len(beg)] = np.frombuffer(beg, np.uint8)
    if end:
        feat[2048 - len(end) :] = np.frombuffer(end, np.uint8)
    return feat[None]


def labelled_files(n_per_kind: int, part: int, seed: int | None = None) -> list[tuple[str, np.ndarray]]:
    """(magika label, features) for Python sources, ELF libraries and C headers shipped with numpy.

    ``part`` 0 and 1 are disjoint halves (calibration / evaluation). The first ``n_per_kind``
    files in path order, or with ``seed`` a random sample of them (all sizes: the first files
    in path order hold no tiny module, and a file of a few hundred bytes is mostly padding).
    """
    root = Path(np.__file__).parent
    kinds = {"python": "*.py", "elf": "*.so", "c": "*.h"}
    out = []
    for label, pattern in kinds.items():
        files = sorted(root.rglob(pattern))[part::2]
        files = files[:n_per_kind] if seed is None else random.Random(seed).sample(files, min(n_per_kind, len(files)))
        out += [(label, magika_features(f.read_bytes())) for f in files]
    return out


def chord_clips(n: int, seed: int) -> list[tuple[list[list[int]], np.ndarray]]:
    """basic-pitch inputs: 2 s at 22050 Hz of four chords (1–3 MIDI notes each) of decaying
    harmonic tones, with the chords as labels; input shaped [1, 43844, 1]."""
    sr, length = 22050, 43844
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        t = np.arange(length // 4) / sr
        x = np.zeros(length)
        chords = []
        for k in range(4):
            chord = sorted({int(m) for m in rng.integers(40, 84, size=int(rng.integers(1, 4)))})
            env = np.exp(-t * rng.uniform(1, 4)) * np.minimum(1, t * 200)
            decay = rng.uniform(0.3, 0.7)
            for midi in chord:
                f = 440 * 2 ** ((midi - 69) / 12)
                tone = sum(np.sin(2 * np.pi * f * h * t + rng.uniform(0, 6)) * decay**h
                           for h in range(1, 8) if f * h < 10000)
                x[k * (length // 4) : (k + 1) * (length // 4)] += tone * env * 0.2
            chords.append(chord)
        x += rng.standard_normal(length) * 0.003
        out.append((chords, x.astype(np.float32)[None, :, None]))
    return out


def note_counts(notes: np.ndarray, chords: list[list[int]], threshold: float = 0.3) -> np.ndarray:
    """(true positives, false positives, false negatives) of note frames above ``threshold``
    against the chords, on the steady part of each quarter of a basic-pitch ``note`` output
    [frames, 88] (piano keys from MIDI 21)."""
    per = notes.shape[0] // len(chords)
    counts = np.zeros(3, np.int64)
    for k, chord in enumerate(chords):
        on = notes[k * per + 4 : (k + 1) * per - 8] > threshold
        truth = np.zeros(88, bool)
        truth[np.array(chord) - 21] = True
        counts += [(on & truth).sum(), (on & ~truth).sum(), (~on & truth).sum()]
    return counts


def f1_score(counts: np.ndarray) -> float:
    tp, fp, fn = counts
    return float(2 * tp / (2 * tp + fp + fn))


def skimage_data() -> Path:
    """scikit-image's bundled sample photos and its LFW face / non-face subset."""
    return _unpack("scikit_image", "skimage/data/") / "skimage" / "data"


def lfw_patches() -> tuple[np.ndarray, np.ndarray]:
    """200 grey 25×25 patches from skimage's ``lfw_subset``: the first 100 faces, then 100 not."""
    x = np.load(skimage_data() / "lfw_subset.npy")
    return x, np.arange(len(x)) < 100


_BACKGROUNDS = ("grass.png", "brick.png", "gravel.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                "hubble_deep_field.jpg", "chelsea.png")


def face_scenes(indices: range, seed: int) -> list[tuple[bool, np.ndarray]]:
    """(face present, NCHW input in [-1, 1]) for MediaPipe's 128×128 face detector: an LFW
    patch (face or not) pasted at a random place and size on a crop of a real photo."""
    root = skimage_data()
    backgrounds = [np.asarray(Image.open(root / n).convert("RGB")) for n in _BACKGROUNDS]
    patches, is_face = lfw_patches()
    rng = np.random.default_rng(seed)
    out = []
    for i in indices:
        bg = backgrounds[int(rng.integers(len(backgrounds)))]
        h, w, _ = bg.shape
        c = int(rng.integers(128, min(h, w)))
        y, x = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
        im = Image.fromarray(bg[y : y + c, x : x + c]).resize((128, 128))
        size = int(rng.integers(40, 72))
        patch = Image.fromarray((patches[i] * 255).astype(np.uint8)).resize((size, size)).convert("RGB")
        im.paste(patch, (int(rng.integers(0, 128 - size)), int(rng.integers(0, 128 - size))))
        out.append((bool(is_face[i]), (np.asarray(im, np.float32).transpose(2, 0, 1)[None] / 127.5 - 1)))
    return out


def face_crops(indices: range, size: int = 48) -> list[tuple[bool, np.ndarray]]:
    """(face, NCHW input) for MTCNN's nets (P 12, R 24, O 48 pixels): LFW patches resized,
    scaled as MTCNN does."""
    patches, is_face = lfw_patches()
    out = []
    for i in indices:
        im = Image.fromarray((patches[i] * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR).convert("RGB")
        x = (np.asarray(im, np.float32) - 127.5) * 0.0078125
        out.append((bool(is_face[i]), x.transpose(2, 0, 1)[None].copy()))
    return out


def photo_crops(n: int, size: int, seed: int) -> list[np.ndarray]:
    """Square crops of scikit-image's photos, resized to ``size`` and scaled to [0, 1] (NCHW)."""
    root = skimage_data()
    photos = [np.asarray(Image.open(root / name).convert("RGB")) for name in
              ("astronaut.png", "coffee.png", "chelsea.png", "motorcycle_left.png", "rocket.jpg", "camera.png")]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = photos[int(rng.integers(len(photos)))]
        h, w, _ = img.shape
        c = int(rng.integers(min(h, w) // 4, min(h, w)))
        y, x = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
        im = Image.fromarray(img[y:y + c, x:x + c]).resize((size, size), Image.BILINEAR)
        out.append((np.asarray(im, np.float32) / 255.0).transpose(2, 0, 1)[None].copy())
    return out


#: scikit-image photos whose subject is an ImageNet class, with the class indices that name it
#: (EfficientNet's labels: 281/282/285 tabby, tiger and Egyptian cat; 967/968/504 espresso, cup,
#: coffee mug; 665/670 moped, motor scooter; 657/744/812 missile, projectile, space shuttle;
#: 872/759 tripod, reflex camera).
LABELLED_PHOTOS = {"chelsea.png": (281, 282, 285), "coffee.png": (967, 968, 504), "motorcycle_left.png": (665, 670),
                   "motorcycle_right.png": (665, 670), "rocket.jpg": (657, 744, 812), "camera.png": (872, 759)}
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]


def labelled_photos(n: int, seed: int, size: int = 224) -> list[tuple[tuple[int, ...], np.ndarray]]:
    """``n`` random square crops (60-100 % of the short side, half of them mirrored) of the
    ``LABELLED_PHOTOS``, resized to ``size`` and normalised with ImageNet's mean and std (NCHW),
    each with the ImageNet classes that count as right."""
    root = skimage_data()
    names = sorted(LABELLED_PHOTOS)
    photos = {name: np.asarray(Image.open(root / name).convert("RGB")) for name in names}
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        name = names[int(rng.integers(len(names)))]
        img = photos[name]
        h, w, _ = img.shape
        c = int(rng.integers(int(min(h, w) * 0.6), min(h, w) + 1))
        y, x = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
        im = np.asarray(Image.fromarray(img[y:y + c, x:x + c]).resize((size, size), Image.BILINEAR), np.float32) / 255
        if rng.random() < 0.5:
            im = im[:, ::-1]
        out.append((LABELLED_PHOTOS[name], ((im.transpose(2, 0, 1) - IMAGENET_MEAN) / IMAGENET_STD)[None]
                    .astype(np.float32)))
    return out


def speech_recording() -> np.ndarray:
    """4 s of one speaker at 16 kHz, float in [-1, 1]."""
    target = CACHE / "pkgs" / "pysptk" / "arctic_a0007.wav"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(wheel_path("pysptk")) as t:
            member = next(m for m in t.getmembers() if m.name.endswith("example_audio_data/arctic_a0007.wav"))
            f = t.extractfile(member)
            assert f is not None
            target.write_bytes(f.read())
    with wave.open(str(target)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768


VAD_CHUNK = 512


def _background(kind: int, n: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(n) / 16000.0
    white = rng.standard_normal(n)
    if kind == 0:
        return white
    if kind == 1:  # brown-ish noise
        b = np.cumsum(white)
        return (b - np.convolve(b, np.ones(801) / 801, "same")) / 10
    if kind == 2:  # mains hum with harmonics
        f = rng.choice([50.0, 60.0])
        return sum(np.sin(2 * np.pi * f * k * t + rng.uniform(0, 6)) / k for k in range(1, 8)) + 0.1 * white
    notes = 220.0 * 2 ** (rng.integers(0, 24, size=4) / 12)  # a chord: steady tones, not speech
    return sum(np.sin(2 * np.pi * f * t) for f in notes) + 0.05 * white


def vad_scenes(n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(16 kHz signal, speech label per 512-sample chunk): speech pieces, re-pitched by up to
    ±15 %, at 0–25 dB over a background that runs through pauses; a chunk is speech when the
    clean speech in it is within 30 dB of the piece's loudest chunk."""
    x = speech_recording()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        pieces, labels = [], []
        for _ in range(int(rng.integers(2, 4))):
            gap = np.zeros(int(rng.integers(4, 20)) * VAD_CHUNK, np.float32)
            start = int(rng.integers(0, len(x) - 16000))
            piece = x[start : start + int(rng.integers(16000, len(x) - start + 1))]
            rate = rng.uniform(0.85, 1.15)
            piece = np.interp(np.arange(0, len(piece) - 1, rate), np.arange(len(piece)), piece)
            piece = piece[: len(piece) // VAD_CHUNK * VAD_CHUNK] / max(np.abs(piece).max(), 1e-6)
            rms = np.sqrt((piece.reshape(-1, VAD_CHUNK) ** 2).mean(axis=1))
            pieces += [gap, piece * rng.uniform(0.1, 0.9)]
            labels += [np.zeros(len(gap) // VAD_CHUNK, bool), rms > rms.max() * 10 ** (-30 / 20)]
        clean = np.concatenate(pieces)
        bg = _background(int(rng.integers(4)), len(clean), rng)
        speech_power = np.mean(clean[np.repeat(np.concatenate(labels), VAD_CHUNK)] ** 2)
        bg *= np.sqrt(speech_power / np.mean(bg**2) / 10 ** (rng.uniform(0, 25) / 10))
        out.append(((clean + bg).astype(np.float32), np.concatenate(labels)))
    return out


def vad_stream(session, signal: np.ndarray, feeds: list | None = None) -> np.ndarray:
    """Speech probability per chunk from silero-vad run as it streams (its state and 64-sample
    context carried from chunk to chunk); ``feeds`` collects each chunk's inputs."""
    state = np.zeros((2, 1, 128), np.float32)
    context = np.zeros(64, np.float32)
    probs = []
    for k in range(0, len(signal) - VAD_CHUNK + 1, VAD_CHUNK):
        chunk = signal[k : k + VAD_CHUNK]
        feed = {"input": np.concatenate([context, chunk])[None], "state": state}
        if feeds is not None:
            feeds.append(feed)
        p, state = session.run(None, feed)
        probs.append(float(np.asarray(p).ravel()[0]))
        context = chunk[-64:]
    return np.array(probs)


def vad_calibration(model, scenes: int = 8, seed: int = 1) -> list[dict]:
    """Every chunk of ``scenes`` noisy scenes, each with the state float silero carried into it."""
    from tests.conftest import session

    feeds: list[dict] = []
    sess = session(model)
    for x, _ in vad_scenes(scenes, seed):
        vad_stream(sess, x, feeds)
    return feeds
