"""The page and HTTP API of `llcm serve`: a thin caller of LLCMPipeline with hard limits and a bounded queue.

Three layers, each small:

* :class:`Service` checks a request against :class:`Limits` and the pipeline's own checks (whose
  warnings, e.g. a w outside the trained range, go back with the answer), admits at most
  ``limits.queue`` requests at a time (running or waiting; the next one gets :class:`Busy` at once),
  runs them one by one through the pipeline and writes the PNGs with ``llcm.images.write_images``
  into a fresh folder under the output folder, plus a zip of that folder. No model logic lives here.
* :func:`build_page` is the Gradio page: prompt (the model's classes as examples), steps, seed and
  randomize, guidance within the trained range, number of images, a gallery, a zip download, the
  same seed at 1, 2, 4 and 8 steps side by side, and the model's facts and card.
* :func:`build_app` puts ``POST /api/generate`` and ``GET /api/info`` beside the page on one
  FastAPI app; :func:`serve` runs it with uvicorn.

Nothing a client sends names a file or folder: request folders are named by the server, the page has
no upload, and Gradio's own cache is kept inside the output folder.
"""

# no `from __future__ import annotations`: FastAPI reads the request model from the live annotation
import base64
import ipaddress
import json
import os
import re
import secrets
import shutil
import socket
import sys
import textwrap
import threading
import time
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from llcm.images import write_images
from llcm.errors import UserError
from llcm.sampling import MAX_SEED, max_steps

COMPARE_STEPS = (1, 2, 4, 8)
MAX_PROMPT_CHARS = 500
CARD_MAX_CHARS = 50_000


@dataclass(frozen=True)
class Limits:
    """Hard limits of one server; every request beyond them gets a clear message, never a crash."""

    max_steps: int = 8
    max_images: int = 4  # per request
    max_size: int = 1024  # pixels, height and width
    queue: int = 8  # requests admitted at once (running + waiting)


class Busy(Exception):
    """The queue is full; the client should retry later."""


@dataclass
class Result:
    request_id: str
    folder: Path
    files: list[Path]
    captions: list[str]
    zip: Path
    seconds: float
    generations: list = field(default_factory=list)  # llcm.pipeline.Generation, one per pipeline call
    warnings: list[str] = field(default_factory=list)  # the pipeline's advice (w outside the trained range)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def random_seed() -> int:
    return secrets.randbelow(2**31)


def read_model_card(folder: Path | None) -> str | None:
    """The model folder's README.md (markdown; front matter and images removed), if it has one."""
    if folder is None or not (folder / "README.md").is_file():
        return None
    text = (folder / "README.md").read_text(encoding="utf-8", errors="replace")[:CARD_MAX_CHARS]
    text = re.sub(r"\A---\n.*?\n---\n", "", text, flags=re.S)  # YAML front matter
    # images would be fetched by the browser (relative ones don't exist here, remote ones leave this machine)
    return re.sub(r"!\[([^\]]*)\]\([^)]*\)", r"[image: \1]", text).strip()


class Service:
    """Checks, queues and runs generation requests for one pipeline; writes only under `out`."""

    def __init__(self, pipe, out: str | os.PathLike, limits: Limits = Limits(), card: str | None = None,
                 notes: list[str] | None = None):
        self.pipe = pipe
        self.out = Path(out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.limits = limits
        self.card = card
        self.notes = list(notes or [])  # warnings about the model, shown on the page
        self._slots = threading.BoundedSemaphore(limits.queue)
        self._run = threading.Lock()
        size = pipe.default_size()
        if size > limits.max_size:
            raise UserError(f"the model's image size {size} exceeds --max-size {limits.max_size}")

    # ----------------------------------------------------------------------------- requests
    @property
    def steps_range(self) -> tuple[int, int]:
        return 1, min(self.limits.max_steps, max_steps(self.pipe.schedule.num_train_timesteps, self.pipe.config.k))

    @property
    def budget(self) -> int:
        """Most pixel-steps (images x steps x height x width) one request may ask for: the most steps and images at
        the model's own size. A CPU serves that in seconds; a 1024-px request of a 64-px model would tie the
        server up for minutes while every other client waits."""
        return self.pipe.default_size() ** 2 * self.steps_range[1] * self.limits.max_images

    @property
    def compare_steps(self) -> list[int]:
        return [s for s in COMPARE_STEPS if s <= self.steps_range[1]]

    def check(self, prompt: str, steps: int, seed: int, w: float | None, n: int,
              height: int | None = None, width: int | None = None) -> tuple[float, list[str]]:
        """Raise UserError for a request outside the limits or one the pipeline refuses; return the guidance w
        to use and the pipeline's warnings (a w outside the model's trained range is advice, not a limit)."""
        lim = self.limits
        if not isinstance(prompt, str) or len(prompt) > MAX_PROMPT_CHARS:
            raise UserError(f"the prompt must be text of at most {MAX_PROMPT_CHARS} characters")
        lo, hi = self.steps_range
        if not lo <= steps <= hi:
            raise UserError(f"steps must be between {lo} and {hi}, got {steps}")
        if not 1 <= n <= lim.max_images:
            raise UserError(f"number of images must be between 1 and {lim.max_images}, got {n}")
        if not 0 <= seed <= MAX_SEED - n:
            raise UserError(f"seed must be between 0 and {MAX_SEED - n}, got {seed}")
        for name, v in (("height", height), ("width", width)):
            if v is not None and not 1 <= v <= lim.max_size:
                raise UserError(f"{name} must be between 1 and {lim.max_size} pixels, got {v}")
        size = self.pipe.default_size()
        h, wd = size if height is None else height, size if width is None else width
        cost, budget = n * steps * h * wd, self.budget
        if cost > budget:
            raise UserError(
                f"this request asks for {n} image{'s' * (n > 1)} x {steps} step{'s' * (steps > 1)} x {h}x{wd} px "
                f"= {cost:,} pixel-steps, over this server's budget of {budget:,} per request ({size}x{size} px, "
                f"the model's size, x {hi} steps x {lim.max_images} images); ask for fewer images, fewer steps "
                "or a smaller size")
        w = self.pipe.config.w_default if w is None else float(w)
        return w, self.pipe.check_request(steps, w, h, wd, n)

    @contextmanager
    def admitted(self) -> Iterator[None]:
        """Hold a queue slot (or raise Busy at once), then wait for the model."""
        if not self._slots.acquire(blocking=False):
            raise Busy(f"busy: {self.limits.queue} requests are already running or waiting "
                       "(the server's queue limit); try again in a few seconds")
        try:
            with self._run:
                yield
        finally:
            self._slots.release()

    def generate(self, prompt: str, steps: int = 4, seed: int = 0, w: float | None = None, n: int = 1,
                 height: int | None = None, width: int | None = None) -> Result:
        """`n` images of one prompt, seeds seed..seed+n-1, as in `llcm generate --batch n`."""
        w, advice = self.check(prompt, steps, seed, w, n, height, width)
        with self.request_folder() as folder:
            t0 = time.perf_counter()
            gen = self.pipe([prompt] * n, steps=steps, seeds=seed, w=w, height=height, width=width)
            files = write_images(gen, folder, self.pipe.name)
            return self._finish(folder, files, [f"seed {s}" for s in gen.seeds], [gen], t0, advice)

    def compare(self, prompt: str, seed: int = 0, w: float | None = None) -> Result:
        """One seed at 1, 2, 4 and 8 steps (those within the limits), as in the LCM paper's Fig. 1."""
        w, advice = self.check(prompt, 1, seed, w, 1)
        with self.request_folder() as folder:
            t0 = time.perf_counter()
            files, captions, gens = [], [], []
            for steps in self.compare_steps:
                gen = self.pipe([prompt], steps=steps, seeds=seed, w=w)
                files += write_images(gen, folder / f"steps-{steps}", self.pipe.name)
                captions.append(f"{steps} step{'s' * (steps > 1)}")
                gens.append(gen)
            return self._finish(folder, files, captions, gens, t0, advice)

    @contextmanager
    def request_folder(self) -> Iterator[Path]:
        """Once admitted, a new folder under `out`, named by the server only; removed if the request fails."""
        with self.admitted():
            while True:
                folder = self.out / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
                try:
                    folder.mkdir()
                    break
                except FileExistsError:
                    continue
            try:
                yield folder
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise

    def _finish(self, folder: Path, files: list[Path], captions: list[str], gens: list, t0: float,
                advice: list[str]) -> Result:
        archive = folder / f"llcm-{folder.name}.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as z:  # PNGs are compressed already
            for p in sorted(folder.rglob("*")):
                if p.is_file() and p != archive:
                    z.write(p, p.relative_to(folder).as_posix())
        return Result(folder.name, folder, files, captions, archive, time.perf_counter() - t0, gens, advice)

    # ----------------------------------------------------------------------------- facts
    def info(self) -> dict:
        p, cfg = self.pipe, self.pipe.config
        lo, hi = self.steps_range
        return {"model": p.name, "model_hash": p.model_hash, "size": p.default_size(), "classes": list(cfg.classes),
                "w_min": cfg.w_min, "w_max": cfg.w_max, "w_default": cfg.w_default, "k": cfg.k,
                "solver": cfg.solver, "source": cfg.source, "notes": self.notes, "model_card": self.card is not None,
                "limits": {"steps": [lo, hi], "images_per_request": self.limits.max_images,
                           "max_size": self.limits.max_size, "pixel_steps": self.budget,
                           "queue": self.limits.queue,
                           "prompt_chars": MAX_PROMPT_CHARS}}

    def facts_markdown(self) -> str:
        i = self.info()
        lim = i["limits"]
        lines = [f"**Model** `{i['model']}` · weights hash `{i['model_hash']}` · {i['size']}×{i['size']} px · "
                 f"distilled with `{i['solver']}`, k = {i['k']} · guidance w trained in [{i['w_min']}, {i['w_max']}]"]
        classes = ", ".join(f"`{c}`" for c in i["classes"])
        lines.append(f"**Trained on {len(i['classes'])} classes:** {classes}" if classes
                     else "**Classes:** the model lists none.")
        if i["source"]:  # absolute paths of the training machine are shown by their last part only
            shown = {k: Path(v).name if isinstance(v, str) and os.path.isabs(v) else v for k, v in i["source"].items()}
            lines.append("**Provenance:** " + "; ".join(f"{k}: `{json.dumps(v)[:200]}`" for k, v in shown.items()))
        lines.append(f"**Limits:** steps {lim['steps'][0]}–{lim['steps'][1]}, at most {lim['images_per_request']} "
                     f"images per request, {lim['max_size']} px, at most {lim['pixel_steps']:,} pixel-steps "
                     f"(images × steps × height × width) per request, {lim['queue']} requests queued at once. "
                     "Images are saved on the server in its output folder, with their prompt, seed, steps, w and model hash.")
        if not self.card:
            lines.append("*This model folder has no model card (README.md).*")
        return "\n\n".join(lines)


# ================================================================================= the page
def build_page(service: Service, banner: str = ""):
    import gradio as gr

    cfg = service.pipe.config
    lo, hi = service.steps_range
    lim = service.limits

    def answer(call, tab: str, seed, randomize: bool):
        seed = random_seed() if randomize or seed is None else int(seed)
        try:
            r = call(seed)
        except (Busy, UserError) as exc:
            title = "Busy" if isinstance(exc, Busy) else "Cannot generate"
            raise gr.Error(str(exc), title=title, print_exception=False) from None
        images = [(str(f), c) for f, c in zip(r.files, r.captions)]
        return images, summary(r), str(r.zip), seed, gr.Tabs(selected=tab)

    def on_generate(prompt, steps, seed, randomize, w, n):
        return answer(lambda s: service.generate(prompt or "", int(steps), s, float(w), int(n)), "images", seed,
                      randomize)

    def on_compare(prompt, seed, randomize, w):
        return answer(lambda s: service.compare(prompt or "", s, float(w)), "compare", seed, randomize)

    with gr.Blocks(title="llcm", analytics_enabled=False, delete_cache=(3600, 3600)) as page:
        gr.Markdown("## llcm · few-step medical image generation\n" + banner, elem_id="banner")
        for note in service.notes:
            gr.Markdown(f"⚠️ **{note}**", elem_id="model-note")
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", placeholder="e.g. axial brain MRI, T1-weighted", lines=2,
                                    max_length=MAX_PROMPT_CHARS, elem_id="prompt")
                if cfg.classes:
                    gr.Examples([[c] for c in cfg.classes], inputs=[prompt], label="The model's classes")
                with gr.Row():
                    go = gr.Button("Generate", variant="primary", elem_id="generate")
                    cmp_btn = gr.Button("Compare steps", elem_id="compare-button")
                with gr.Accordion("Advanced", open=True):
                    steps = gr.Slider(lo, hi, value=min(4, hi), step=1, label="Steps", elem_id="steps")
                    with gr.Row():
                        seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED - lim.max_images,
                                         elem_id="seed")
                        randomize = gr.Checkbox(False, label="Randomize seed", elem_id="randomize")
                    w = gr.Slider(cfg.w_min, cfg.w_max, value=cfg.w_default, step=0.1,
                                  label="Guidance w (LCM form; SD guidance scale = 1 + w)", elem_id="guidance")
                    n = gr.Slider(1, lim.max_images, value=min(2, lim.max_images), step=1, label="Number of images",
                                  elem_id="n-images")
            with gr.Column(scale=3):
                with gr.Tabs(selected="images") as tabs:
                    with gr.Tab("Images", id="images"):
                        gallery = gr.Gallery(label="Images", columns=4, object_fit="contain", height=320,
                                             elem_id="gallery", buttons=["download", "fullscreen"])
                    with gr.Tab(f"Same seed at {' · '.join(map(str, service.compare_steps))} steps", id="compare"):
                        compare = gr.Gallery(label="Same seed, more steps", columns=4, object_fit="contain",
                                             height=320, elem_id="compare", buttons=["download", "fullscreen"])
                info = gr.Markdown(elem_id="run-info")
                download = gr.File(label="Download the PNGs with their metadata (zip)", elem_id="download",
                                   interactive=False)
        with gr.Accordion("Model", open=True):
            gr.Markdown(service.facts_markdown(), elem_id="model-facts")
            if service.card:
                with gr.Accordion("Model card", open=True):
                    gr.Markdown(service.card, elem_id="model-card")

        ins = [prompt, steps, seed, randomize, w, n]
        go.click(on_generate, ins, [gallery, info, download, seed, tabs], api_name="generate")
        prompt.submit(on_generate, ins, [gallery, info, download, seed, tabs], api_visibility="private")
        cmp_btn.click(on_compare, [prompt, seed, randomize, w], [compare, info, download, seed, tabs],
                      api_name="compare")
    return page.queue(max_size=lim.queue, default_concurrency_limit=1)


def summary(r: Result) -> str:
    g = r.generations[-1]
    steps = ", ".join(str(x.steps) for x in r.generations)
    return (f"{len(r.files)} image{'s' * (len(r.files) > 1)} in {r.seconds:.1f} s · steps {steps} · "
            f"w {g.w} · model hash `{g.model_hash}` · saved as `{r.request_id}` in the server's output folder"
            + "".join(f"\n\n⚠️ {text}" for text in r.warnings))


# ================================================================================= the app
def build_app(service: Service, banner: str = ""):
    """FastAPI app: POST /api/generate, GET /api/info, and the page at /."""
    os.environ["GRADIO_TEMP_DIR"] = str(service.out / ".gradio-cache")  # Gradio's copies stay in the output folder
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr
    from fastapi import FastAPI, Query
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from pydantic import BaseModel, ConfigDict, Field

    class GenerateRequest(BaseModel):
        # unknown fields (a path, say) are refused; strict: "steps": true or "4" or 4.5 is refused, not converted
        model_config = ConfigDict(extra="forbid", strict=True)
        prompt: str = Field(max_length=MAX_PROMPT_CHARS)
        steps: int = 4
        seed: int | None = None  # None: a random seed, returned in the answer
        w: float | None = None  # None: the model's default
        n: int = 1
        height: int | None = None
        width: int | None = None

    app = FastAPI(title="llcm", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_, exc: RequestValidationError):
        msg = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or 'body'}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": f"bad request: {msg}"}, status_code=400)

    @app.get("/api/info")
    def api_info():
        return service.info()

    @app.post("/api/generate")
    def api_generate(req: GenerateRequest, format: str = Query("json", pattern="^(json|zip)$")):
        try:
            r = service.generate(req.prompt, req.steps, random_seed() if req.seed is None else req.seed, req.w,
                                 req.n, req.height, req.width)
        except Busy as exc:
            return JSONResponse({"error": str(exc), "busy": True}, status_code=503, headers={"Retry-After": "5"})
        except UserError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        if format == "zip":
            return FileResponse(r.zip, media_type="application/zip", filename=r.zip.name)
        g = r.generations[0]
        return {"request": r.request_id, "prompt": req.prompt, "steps": g.steps, "w": g.w, "timesteps": g.timesteps,
                "model": service.pipe.name, "model_hash": g.model_hash, "seconds": round(r.seconds, 3),
                "warnings": r.warnings,
                "images": [{"seed": s, "file": f.name, "png_base64": base64.b64encode(f.read_bytes()).decode()}
                           for s, f in zip(g.seeds, r.files)]}

    page = build_page(service, banner)
    return gr.mount_gradio_app(app, page, path="/", footer_links=[], max_file_size=1, ssr_mode=False,
                               theme=gr.themes.Default(), show_error=True)


def load_service(model: str | None, out: str | os.PathLike, limits: Limits,
                 adapter: str | os.PathLike | None = None) -> Service:
    from llcm.pipeline import default_model_path, load_pipeline, resolve_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = load_pipeline(model, adapter=adapter)
    folder = Path(adapter) if adapter else default_model_path() if model is None else resolve_model(model)
    folder = folder if folder is not None and folder.is_dir() else None
    notes = [str(w.message) for w in caught]
    if folder is None:  # one clear line instead of the pipeline's warning
        notes = [n for n in notes if "untrained" not in n]
        notes.append(("no trained default model in this install: " if model is None else "")
                     + f"{pipe.name} is an untrained preset, its images are noise (a plumbing check)")
    return Service(pipe, out, limits, read_model_card(folder), notes)


def exposure_warning(host: str, port: int) -> str:
    line = (f"llcm serve is listening on {host}:{port}, NOT only on this machine (127.0.0.1). Anyone who can "
            "reach this address can use the page and the API: there is no login and no encryption. If this "
            "machine holds clinical data, stop now (Ctrl-C) unless this network is meant to reach it.")
    bar = "!" * 78
    return f"{bar}\n!! WARNING\n!! " + "\n!! ".join(textwrap.wrap(line, 74)) + f"\n{bar}"


def check_port(host: str, port: int) -> None:
    """Fail in a second, before loading the model, when the address cannot be listened on."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            s.bind((host.strip("[]"), port))
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port") from None


def serve(model: str | None = None, host: str = "127.0.0.1", port: int = 7860, out: str | os.PathLike = "out/serve",
          limits: Limits = Limits(), adapter: str | os.PathLike | None = None) -> None:
    """Load the model (and adapter) and serve the page and API until interrupted."""
    import uvicorn

    check_port(host, port)
    service = load_service(model, out, limits, adapter)
    banner = ""
    if not is_loopback(host):
        print(exposure_warning(host, port), file=sys.stderr, flush=True)
        banner = (f"⚠️ **This server listens on {host}, not only on this machine: anyone who can reach it "
                  "can use it.**")
    app = build_app(service, banner)
    i = service.info()
    print(f"llcm serve: model {i['model']} ({i['model_hash']}); images go to {service.out}\n"
          f"llcm serve: limits: steps {i['limits']['steps'][0]}-{i['limits']['steps'][1]}, "
          f"{limits.max_images} images/request, {limits.max_size} px, {service.budget:,} pixel-steps/request "
          f"(images x steps x height x width), queue {limits.queue}", flush=True)
    for note in service.notes:
        print(f"llcm serve: note: {note}", flush=True)
    url_host = f"[{host}]" if ":" in host else host
    print(f"llcm serve: open http://{url_host}:{port}/  (API: POST http://{url_host}:{port}/api/generate)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
