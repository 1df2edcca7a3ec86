"""Regenerates docs/demo.png: the demo serving a train.py workdir, asked with one prompt, in
headless Chromium (Debian's chromium + playwright, as the browser test).

    python docs/screenshot_demo.py --workdir workdir/mnist_txt2img --prompt "an image of a seven"
"""

from __future__ import annotations

import argparse
import socket
import tempfile
from pathlib import Path

BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="workdir/mnist_txt2img")
    p.add_argument("--prompt", default="an image of a seven")
    p.add_argument("--num", type=int, default=8)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--chromium", default="/usr/bin/chromium")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the images")
    p.add_argument("--out", default=str(Path(__file__).with_name("demo.png")))
    args = p.parse_args()

    from playwright.sync_api import sync_playwright

    from sgm_jax.cli.demo import build_app, make_service

    service = make_service([args.workdir], out=tempfile.mkdtemp(prefix="sgm_demo_"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = build_app(service)
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, ssr_mode=False,
                       quiet=True, allowed_paths=[str(service.out_dir)])
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=BROWSER_FLAGS, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#prompt textarea", timeout=60000)
            page.wait_for_load_state("networkidle")
            page.wait_for_timeout(2000)  # the model's fields are filled by a load event: fill ours after it
            page.locator("#prompt textarea").fill(args.prompt)
            page.locator("#seed input").fill(str(args.seed))
            page.locator("#num input").fill(str(args.num))
            page.locator("#generate").click()
            try:
                page.wait_for_function(f"document.querySelectorAll('#gallery img').length == {args.num}",
                                       timeout=int(args.timeout * 1000))
            except Exception:  # keep what the page showed (an error line, a half-filled form)
                failed = Path(tempfile.gettempdir()) / "sgm_demo_screenshot_failed.png"
                page.screenshot(path=str(failed), full_page=True)
                raise SystemExit(f"no {args.num} images after {args.timeout:.0f} s: the page is in {failed}")
            page.wait_for_timeout(1000)  # let the gallery lay its images out
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        app.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
