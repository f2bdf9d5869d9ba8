"""The web app in a real browser: headless Chromium (the system's, driven by Playwright) chats with the app over a
tiny checkpoint: rounds with an uploaded image, each answer's image read back from the page, undo, bad uploads
shown as messages, the downloaded zip loaded back (and a history JSON with its images) and continued, and two
browser sessions with separate histories."""
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():  # .ci/run installs it and sets CIG_REQUIRE_CHROMIUM, so CI never skips this
    if os.environ.get("CIG_REQUIRE_CHROMIUM"):
        raise RuntimeError("CIG_REQUIRE_CHROMIUM is set but Debian's chromium is not installed")
    pytest.skip("needs Debian's chromium (apt-get install chromium chromium-driver)", allow_module_level=True)
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
WAIT = 300  # seconds a round may take on a loaded CPU


@pytest.fixture(scope="module")
def app_url(tiny_run, tmp_path_factory):  # conftest.py: a tiny run with random weights
    import portpicker

    from cig_jax.app.ui import launch
    from cig_jax.sample.session import ChatSession

    base = ChatSession.from_checkpoint(tiny_run, identity_embedder=False, max_len=1024)
    root = tmp_path_factory.mktemp("app_files")
    demo, url = launch(base, root, host="127.0.0.1", port=portpicker.pick_unused_port(), block=False)
    assert url.startswith("http://127.0.0.1:")
    yield url
    demo.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        contexts = []

        def open_session():  # a separate browser (its own fresh profile): a separate app session
            ctx = p.chromium.launch_persistent_context(tempfile.mkdtemp(prefix="chromium_"), executable_path=CHROMIUM,
                                                       headless=True, args=ARGS)
            contexts.append(ctx)
            return ctx.new_page()

        yield open_session
        for ctx in contexts:
            ctx.close()


class Chat:
    """One browser tab on the app."""

    def __init__(self, page, url):
        self.page = page
        page.goto(url)
        page.wait_for_selector("#msg textarea", timeout=120_000)

    def info(self) -> dict:
        text = self.page.input_value("#info textarea")
        return json.loads(text) if text else {"rounds": 0}

    def user_texts(self) -> list:
        """The user turns' texts (an image of a turn is a line of its own, without text)."""
        return [t.strip() for t in self.page.locator("#chat .user-row").all_inner_texts() if t.strip()]

    def bot_texts(self) -> list:
        return [t.strip() for t in self.page.locator("#chat .bot-row").all_inner_texts()]

    def send(self, text, image=None, force=True, wait=True):
        """Types a turn (with an image file) and waits until the page shows its answer (one more bot line)."""
        before = len(self.bot_texts())
        box = self.page.locator("#force input[type=checkbox]")
        if box.is_checked() != force:
            box.click()
        if image is not None:
            self.page.set_input_files("#msg input[type=file]", str(image))
            name = Path(image).name
            self.page.wait_for_function(f"() => document.querySelectorAll('#msg img').length > 0"
                                        f" || document.querySelector('#msg').innerText.includes('{name}')",
                                        timeout=60_000)
        self.page.fill("#msg textarea", text)
        self.page.press("#msg textarea", "Enter")
        if wait:
            self.wait_bot(before + 1)

    def wait_bot(self, n):
        self.page.wait_for_function(f"() => document.querySelectorAll('#chat .bot-row').length >= {n}",
                                    timeout=WAIT * 1000)
        self.page.wait_for_function("() => !document.querySelector('#chat .pending, #chat .generating')",
                                    timeout=WAIT * 1000)
        time.sleep(0.5)

    def bot_images(self) -> list:
        """For each image in the answers: (the file the page loaded, its pixels as the page drew them)."""
        self.page.wait_for_function("() => [...document.querySelectorAll('#chat .bot-row img')]"
                                    ".every(i => i.complete && i.naturalWidth > 0)", timeout=60_000)
        shots = self.page.evaluate("""() => [...document.querySelectorAll('#chat .bot-row img')].map(img => {
            const c = document.createElement('canvas');
            c.width = img.naturalWidth; c.height = img.naturalHeight;
            const g = c.getContext('2d'); g.drawImage(img, 0, 0);
            return {src: img.src, w: c.width, h: c.height, data: Array.from(g.getImageData(0, 0, c.width, c.height).data)};
        })""")
        out = []
        for s in shots:
            rgba = np.asarray(s["data"], np.uint8).reshape(s["h"], s["w"], 4)
            out.append((s["src"].split("file=", 1)[1], rgba[..., :3]))
        return out


def _picture(path, seed, size=40):
    PILImage.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def _check_rendered(images, n):
    """n answer images on the page, each drawn with the pixels of the PNG the app served, none blank."""
    assert len(images) == n, len(images)
    for src, drawn in images:
        served = np.asarray(PILImage.open(src).convert("RGB"))
        assert drawn.shape == served.shape
        assert np.abs(drawn.astype(int) - served.astype(int)).mean() < 2.0, src
        assert drawn.std() > 5.0 and len(np.unique(drawn.reshape(-1, 3), axis=0)) > 16, src  # not blank


def test_three_rounds_with_an_upload_render_images_and_undo_rolls_back(app_url, browser, tmp_path):
    chat = Chat(browser(), app_url)
    photo = _picture(tmp_path / "photo.png", 1)
    chat.send("Here is my friend.", image=photo)
    chat.send("Draw her at the beach.")
    chat.send("Now in the snow.")
    assert chat.info()["rounds"] == 3
    assert chat.user_texts() == ["Here is my friend.", "Draw her at the beach.", "Now in the snow."]
    _check_rendered(chat.bot_images(), 3)
    assert chat.page.locator("#chat .user-row img").count() == 1  # the upload shows in its turn

    chat.page.click("#undo")
    chat.page.wait_for_function("() => [...document.querySelectorAll('#chat .user-row')]"
                                ".filter(r => r.innerText.trim()).length == 2", timeout=60_000)
    time.sleep(0.5)
    assert chat.info()["rounds"] == 2
    assert chat.user_texts() == ["Here is my friend.", "Draw her at the beach."]
    _check_rendered(chat.bot_images(), 2)
    chat.send("Now in the rain.")  # the rolled-back session goes on
    assert chat.info()["rounds"] == 3 and chat.user_texts()[-1] == "Now in the rain."
    _check_rendered(chat.bot_images(), 3)

    chat.page.click("#export")  # the history JSON and the transcript come back as downloads
    chat.page.wait_for_function("() => document.querySelectorAll('#downloads a').length >= 3", timeout=60_000)
    links = {Path(h.split("file=", 1)[1]).name: h.split("file=", 1)[1]
             for h in chat.page.eval_on_selector_all("#downloads a", "els => els.map(e => e.href)") if "file=" in h}
    from urllib.parse import unquote

    history = json.loads(Path(unquote(links["chat.json"])).read_text())
    assert [r["user_text"] for r in history["rounds"]] == ["Here is my friend.", "Draw her at the beach.",
                                                          "Now in the rain."]
    assert all(r["assistant_image"] is not None for r in history["rounds"])
    assert "Now in the rain." in Path(unquote(links["transcript.html"])).read_text()


def test_bad_uploads_and_an_overfull_context_show_a_message_and_the_session_goes_on(app_url, browser, tmp_path):
    chat = Chat(browser(), app_url)
    chat.send("A first round.")
    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image at all")
    cmyk = tmp_path / "print.jpg"
    PILImage.new("CMYK", (32, 32), (0, 120, 200, 10)).save(cmyk)
    huge = tmp_path / "banner.png"
    PILImage.new("RGB", (5000, 8), (200, 10, 10)).save(huge)
    for path, expected in [(text_file, "not an image"), (cmyk, "CMYK"), (huge, "5000x8")]:
        chat.send("Look at this.", image=path)
        notice = chat.bot_texts()[-1]
        assert expected in notice and "Traceback" not in notice, notice
        assert chat.info()["rounds"] == 1  # the history did not change
    chat.send("and then " * 600)  # more tokens than the session's 1,024 cache slots
    notice = chat.bot_texts()[-1]
    assert "KV-cache slots" in notice and "Traceback" not in notice, notice
    assert chat.info()["rounds"] == 1
    chat.send("Draw a cat.", image=_picture(tmp_path / "ok.png", 2))
    assert chat.info()["rounds"] == 2 and chat.user_texts()[-1].startswith("Draw a cat.")
    _check_rendered(chat.bot_images(), 2)


def _downloads(chat) -> dict:
    """{file name: local path} of the files the Download button offers."""
    from urllib.parse import unquote

    links = "els => els.map(e => e.href)"
    before = chat.page.eval_on_selector_all("#downloads a", links)  # an earlier export's links, if any
    chat.page.click("#export")
    chat.page.wait_for_function("before => { const now = [...document.querySelectorAll('#downloads a')]"
                                ".map(e => e.href); return now.length >= 3 && now.join() !== before.join(); }",
                                arg=before, timeout=60_000)
    hrefs = chat.page.eval_on_selector_all("#downloads a", links)
    return {Path(unquote(h.split("file=", 1)[1])).name: Path(unquote(h.split("file=", 1)[1])) for h in hrefs
            if "file=" in h}


def _load(chat, files, rounds):
    with chat.page.expect_file_chooser() as chooser:  # what a user does: click Load, pick the files
        chat.page.click("#load")
    chooser.value.set_files([str(f) for f in files])
    chat.page.wait_for_function(f"() => document.querySelector('#info textarea').value.includes('\"rounds\": {rounds}')",
                                timeout=WAIT * 1000)
    time.sleep(0.5)


def _seed(chat, value):
    chat.page.fill("#seed input", str(value))
    chat.page.press("#seed input", "Tab")


def test_download_reset_load_the_zip_and_the_chat_goes_on_with_the_same_history(app_url, browser, tmp_path):
    chat = Chat(browser(), app_url)
    chat.send("Here is my friend.", image=_picture(tmp_path / "friend.png", 5))
    chat.send("Draw her at the beach.")
    drawn = [pixels for _, pixels in chat.bot_images()]
    archive = tmp_path / "chat.zip"
    archive.write_bytes(_downloads(chat)["chat.zip"].read_bytes())  # what the browser saves

    chat.page.click("#reset")
    chat.page.wait_for_function("() => document.querySelector('#info textarea').value.includes('\"rounds\": 0')",
                                timeout=60_000)
    _load(chat, [archive], 2)
    assert chat.user_texts() == ["Here is my friend.", "Draw her at the beach."]
    assert chat.page.locator("#chat .user-row img").count() == 1  # the uploaded photo came back
    for (_, again), first in zip(chat.bot_images(), drawn):  # and the answers' images, pixel for pixel
        assert np.abs(again.astype(int) - first.astype(int)).max() <= 1
    # The cache now holds the history as its text encodes (a random model's answers may be byte pieces that
    # encode to other tokens than it sampled): the same slots as a fresh browser session loading the same zip,
    # and the next round, with the same seed, answers the same in both.
    other = Chat(browser(), app_url)
    _load(other, [archive], 2)
    loaded = chat.info()
    assert loaded == other.info() and loaded["cache_slots_used"] > 0
    for c in (chat, other):
        _seed(c, 11)
        c.send("Now in the snow.")
    assert chat.info()["rounds"] == 3 and chat.info()["cache_slots_used"] > loaded["cache_slots_used"]
    assert chat.bot_texts()[-1] == other.bot_texts()[-1] and chat.info() == other.info()
    _check_rendered(chat.bot_images(), 3)
    (_, mine), (_, theirs) = chat.bot_images()[-1], other.bot_images()[-1]
    assert np.abs(mine.astype(int) - theirs.astype(int)).max() <= 1
    history = json.loads(_downloads(chat)["chat.json"].read_text())
    assert [r["user_text"] for r in history["rounds"]] == ["Here is my friend.", "Draw her at the beach.",
                                                          "Now in the snow."]


def test_load_takes_a_history_json_with_its_images_uploaded_beside_it(app_url, browser, tmp_path):
    folder = tmp_path / "saved"
    (folder / "images").mkdir(parents=True)
    photo, answer = _picture(folder / "images" / "maya.png", 7), _picture(folder / "images" / "park.png", 8)
    history = folder / "history.json"
    history.write_text(json.dumps({"version": 1, "id": "saved", "rounds": [
        {"user_text": "This is Maya.", "user_images": ["images/maya.png"], "assistant_text": "Hello Maya.",
         "assistant_image": "images/park.png"},
        {"user_text": "Draw her again.", "assistant_text": "Here she is again."}]}))
    chat = Chat(browser(), app_url)
    _load(chat, [history, photo, answer], 2)  # the JSON names images/x.png; the uploads arrive as x.png
    assert chat.user_texts() == ["This is Maya.", "Draw her again."]
    (src, drawn), = chat.bot_images()
    assert np.abs(drawn.astype(int) - np.asarray(PILImage.open(answer)).astype(int)).max() <= 1
    chat.send("Now at the beach.")
    assert chat.info()["rounds"] == 3


def test_two_browser_sessions_keep_separate_histories(app_url, browser):
    a, b = Chat(browser(), app_url), Chat(browser(), app_url)
    a.send("Alpha one.", wait=False)
    b.send("Bravo one.", wait=False)  # queued behind a's round
    a.wait_bot(1)
    b.wait_bot(1)
    a.send("Alpha two.")
    assert a.user_texts() == ["Alpha one.", "Alpha two."] and a.info()["rounds"] == 2
    assert b.user_texts() == ["Bravo one."] and b.info()["rounds"] == 1
    b.page.reload()  # a fresh page is a fresh session; the other tab's history is untouched
    b.page.wait_for_selector("#msg textarea", timeout=120_000)
    assert b.user_texts() == []
    a.send("Alpha three.")
    assert a.info()["rounds"] == 3


def test_app_cli_help_lists_its_flags_with_defaults(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("cig_app_cli", Path(__file__).resolve().parents[1] / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit):
        module.main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: python app.py") and "--checkpoint" in out and "default: 127.0.0.1" in out

